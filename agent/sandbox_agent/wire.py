"""The names on the wire, in one place: the API group and kind, the sandbox's paths, the labels
the operator puts on what it makes, the default image, and the patterns Kubernetes holds
quantities, names and label values to. Both packages import them from here; nothing copies them.
"""

from __future__ import annotations

# The SandboxTask custom resource.
API_GROUP = "llmsandbox.io"
API_VERSION = "v1alpha1"
KIND = "SandboxTask"
PLURAL = "sandboxtasks"
# The SandboxTaskSet custom resource (same group and version).
SET_PLURAL = "sandboxtasksets"

# The sandbox image for tasks that name none.
DEFAULT_SANDBOX_IMAGE = "llm-sandbox/sandbox-python:0.1.0"

# Paths inside every sandbox, as the model's commands see them.
WORKSPACE = "/workspace"
INPUT_DIR = "input"  # below WORKSPACE: the task's inputs
OUTPUT_DIR = "output"  # below WORKSPACE: files collected when the task ends
INPUT_PATH = f"{WORKSPACE}/{INPUT_DIR}"

# What a run leaves beside OUTPUT_DIR, in its directory and under its artifact-store prefix.
RESULT_FILE = "result.json"
TRAJECTORY_FILE = "trajectory.json"
# Each finished step, appended as the run goes; gone once trajectory.json is written. The
# artifact store keeps one object per step instead, STEPS_DIR/NNNNNN.jsonl (no appends there).
JOURNAL_FILE = "trajectory.jsonl"
STEPS_DIR = "steps"

# Labels and annotations on the objects the operator makes for a task.
MANAGED_BY = "llm-sandbox-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TASK = "llmsandbox.io/task"
LABEL_TASK_UID = "llmsandbox.io/task-uid"
LABEL_ATTEMPT = "llmsandbox.io/attempt"
LABEL_NETWORK = "llmsandbox.io/network"
ANNOTATION_TASK_NAME = "llmsandbox.io/task-name"

# Kubernetes quantities, e.g. 500m, 2, 1.5, 512Mi, 4G, 1e3 (group 1 the number, 3 the suffix).
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
# DNS-1123 subdomain: what Kubernetes accepts as an object name.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label key: an optional DNS-subdomain prefix and a name of at most 63 characters.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
# A label value: empty, or at most 63 characters of these, starting and ending alphanumeric.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
