"""The bad-input corpus (tests/corpus/bad_tasks): every malformed SandboxTask is refused, by the
layer its header names, with a message holding its `# expect:` text: by the generated CRD schema
(as the API server applies it), by the pydantic model, or by the operator's cluster-only checks;
through `sandboxctl run` (exit 2, no traceback); and on the emulated cluster (Failed with
invalid_spec, no pod, the operator still serving).

Each corpus file starts with comment lines:

    # what is wrong.
    # expect: text the error message must contain (usually the field path)
    # layer: schema RULE | model | cluster | config | file
    # expect-local: (optional) what `sandboxctl run` says instead, when it refuses it otherwise

`schema RULE` is the CRD schema rule that rejects it (spec.limits.maxSteps:minimum; unknown fields
read PATH:unknown-field, refused by the API server's strict field validation); the model must
then reject it too, since the operator and sandboxctl re-validate. `model`: the schema accepts it,
the pydantic model refuses it. `cluster`: schema and model accept it, `validate_for_cluster`
refuses it. `config`: a valid spec whose referenced object is missing (config_error on a
cluster). `file`: not one YAML document at all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from crdschema import VALIDATOR, open_api, schema_path
from k8s.emulator import EmulatedApiServer
from k8s.kubelet import TestKubelet
from llmserver import ScriptedLLMServer, tool_call
from sandbox_agent.errors import TaskSpecError
from sandbox_agent.task import MAX_PROMPT_CHARS
from sandbox_agent.taskfile import load_task_file
from sandbox_agent.wire import API_GROUP, API_VERSION, KIND, NAME_PATTERN
from sandbox_operator.cluster_checks import validate_for_cluster
from sandbox_operator.errors import SpecError
from sandbox_operator.settings import OperatorSettings
from test_operator import OPERATOR, TERMINAL, operator_env, pods_of, secret, task, wait_phase

CORPUS = Path(__file__).parent / "corpus" / "bad_tasks"
SETTINGS = OperatorSettings(
    default_base_url="http://llm.invalid/v1",
    default_model="some-model",
    default_api_key_secret="llm-key",
)
# sandboxctl accepts these locally although a cluster refuses them: the gaps this corpus found.
# xfail(strict) so that closing a gap turns the test red until the entry is removed here.
# Entries sandboxctl run accepts although the operator refuses them (none left: keep it so).
LOCAL_GAPS: dict[str, str] = {}


@dataclass(frozen=True)
class Entry:
    name: str
    text: str
    expect: str
    layer: str  # "schema RULE", "model", "cluster", "config" or "file"
    expect_local: str = ""  # what sandboxctl says, where it refuses it for another reason

    @property
    def local_expect(self) -> str:
        return self.expect_local or self.expect

    def doc(self) -> Any:
        return yaml.safe_load(self.text)

    def write(self, directory: Path) -> Path:
        path = directory / f"{self.name}.yaml"
        path.write_text(self.text, encoding="utf-8")
        return path


def _header(text: str, key: str, *, required: bool = True) -> str:
    match = re.search(rf"^# {key}: (.+)$", text, re.MULTILINE)
    assert match or not required, f"no '# {key}:' line"
    return match.group(1).strip() if match else ""


def _generated() -> list[Entry]:
    """Entries too big to keep as files."""
    prompt = "x" * (MAX_PROMPT_CHARS + 1)
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": "bad-task"},
        "spec": {"prompt": prompt},
    }
    text = (
        f"# a prompt one character over the {MAX_PROMPT_CHARS}-character limit.\n"
        "# expect: spec.prompt\n# layer: schema spec.prompt:maxLength\n" + yaml.safe_dump(doc)
    )
    return [Entry("generated-prompt-too-long", text, "spec.prompt", "schema spec.prompt:maxLength")]


def corpus() -> list[Entry]:
    entries = []
    for path in sorted(CORPUS.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        entries.append(
            Entry(
                path.stem,
                text,
                _header(text, "expect"),
                _header(text, "layer"),
                _header(text, "expect-local", required=False),
            )
        )
    return entries + _generated()


ENTRIES = corpus()
IDS = [e.name for e in ENTRIES]


# --- the CRD schema as the API server applies it ---------------------------------------------


OPEN_API = open_api()


def _unknown_fields(node: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the structural schema does not declare: the API server prunes them, or refuses
    them under strict field validation (kubectl's default)."""
    found: list[str] = []
    if isinstance(node, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if props is not None and key in props:
                found += _unknown_fields(value, props[key], where)
            elif isinstance(extra, dict):
                found += _unknown_fields(value, extra, where)
            elif props is not None:
                found.append(f"{where}:unknown-field")
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            found += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def schema_rules(doc: Any) -> list[str]:
    """Every CRD schema rule the document breaks; empty when the API server would store it."""
    rules = sorted(schema_path(e) for e in VALIDATOR.iter_errors(doc))
    if isinstance(doc, dict):
        rules += _unknown_fields(doc, OPEN_API)
    return rules


def creatable_on_a_cluster(entry: Entry) -> bool:
    """What a real API server would store as a SandboxTask (the schema also passes)."""
    if entry.layer == "file":
        return False
    doc = entry.doc()
    if not isinstance(doc, dict) or schema_rules(doc):
        return False
    if (doc.get("apiVersion"), doc.get("kind")) != (f"{API_GROUP}/{API_VERSION}", KIND):
        return False  # no such resource: the server routes by apiVersion and kind
    name = str((doc.get("metadata") or {}).get("name") or "")
    # The API server validates names of custom resources as DNS subdomains.
    return len(name) <= 253 and re.fullmatch(NAME_PATTERN, name) is not None


# --- 1. which layer refuses each entry --------------------------------------------------------


def test_the_corpus_is_big_enough_and_every_file_says_what_is_wrong() -> None:
    files = sorted(CORPUS.glob("*.yaml"))
    assert len(files) >= 30
    for path in files:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# "), path.name
        assert not first.startswith("# expect:"), path.name
    layers = {e.layer.split()[0] for e in ENTRIES}
    assert layers == {"schema", "model", "cluster", "config", "file"}


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_each_entry_is_refused_by_the_layer_it_names(
    entry: Entry, tmp_path: Path, record_property: Any
) -> None:
    path = entry.write(tmp_path)
    layer, _, rule = entry.layer.partition(" ")
    record_property("layer", entry.layer)

    if layer == "file":
        with pytest.raises(TaskSpecError) as file_error:
            load_task_file(path)
        assert entry.expect in str(file_error.value)
        print(f"{entry.name}: refused by the YAML loader: {file_error.value}")
        return

    rules = schema_rules(entry.doc())
    model_error = cluster_error = None
    try:
        loaded = load_task_file(path)
    except TaskSpecError as exc:
        model_error = str(exc)
    else:
        try:
            validate_for_cluster(loaded, SETTINGS)
        except SpecError as exc:
            cluster_error = str(exc)

    if layer == "schema":
        assert rule in rules, f"schema rules broken: {rules}"
        # The operator and sandboxctl re-validate with the model: it refuses it as well.
        assert model_error is not None, "the model accepts what the schema refuses"
        assert entry.expect in model_error
        print(f"{entry.name}: refused by the CRD schema rule {rule}")
    elif layer == "model":
        assert rules == [], "the schema refuses it: the header should say so"
        assert model_error is not None, "the model accepts it"
        assert entry.expect in model_error
        print(f"{entry.name}: refused by the pydantic model: {model_error.splitlines()[-1]}")
    elif layer == "cluster":
        assert rules == [], rules
        assert model_error is None, model_error
        assert cluster_error is not None, "validate_for_cluster accepts it"
        assert entry.expect in cluster_error
        print(f"{entry.name}: refused by validate_for_cluster: {cluster_error}")
    else:
        assert layer == "config", entry.layer
        assert (rules, model_error, cluster_error) == ([], None, None)
        print(f"{entry.name}: a valid spec; the cluster must fail it with config_error")


# --- 2. sandboxctl run -----------------------------------------------------------------------


# One interpreter runs `sandboxctl run FILE --backend process` for every file through the CLI's
# own main(), the way `python -m sandbox_agent.cli` does: starting one interpreter per file costs
# ~0.8 s of imports each, which would dominate the suite. Uncaught exceptions become a traceback in
# that file's stderr, as they would on a terminal.
_DRIVER = """
import contextlib, io, json, sys, traceback
from sandbox_agent.cli import main
results = {}
for path in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["run", path, "--backend", "process"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results[path] = {"returncode": code, "stderr": err.getvalue()}
print(json.dumps(results))
"""


@dataclass(frozen=True)
class LocalRun:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def sandboxctl_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalRun]]:
    """`sandboxctl run FILE --backend process` for the whole corpus, each file in its own
    directory; a model that submits at once stands by in case a spec is (wrongly) accepted."""
    with ScriptedLLMServer() as server:
        server.set_default(tool_call("submit", {"answer": "accepted"}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        env |= {
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": "k",
            "OPENAI_MODEL": "scripted-model",
        }
        paths = {e.name: e.write(tmp_path_factory.mktemp(e.name)) for e in ENTRIES}
        proc = subprocess.run(
            [sys.executable, "-c", _DRIVER, *map(str, paths.values())],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        raw = json.loads(proc.stdout.strip().splitlines()[-1])
        yield {name: LocalRun(**raw[str(path)]) for name, path in paths.items()}


def test_sandboxctl_as_a_command_exits_two_without_a_traceback(tmp_path: Path) -> None:
    """The driver above calls main(); one real `python -m sandbox_agent.cli` run per refusing
    layer shows the command behaves the same."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_MODEL"] = "scripted-model"
    for name in ("maxsteps-zero", "input-path-parent", "top-level-list", "invalid-yaml"):
        entry = next(e for e in ENTRIES if e.name == name)
        file = str(entry.write(tmp_path))
        proc = subprocess.run(
            [sys.executable, "-m", "sandbox_agent.cli", "run", file, "--backend", "process"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert entry.local_expect in proc.stderr
        assert "Traceback" not in proc.stderr


def _local_params() -> list[Any]:
    params = []
    for entry in ENTRIES:
        marks = []
        if entry.name in LOCAL_GAPS:
            marks.append(pytest.mark.xfail(reason=LOCAL_GAPS[entry.name], strict=True))
        params.append(pytest.param(entry, marks=marks, id=entry.name))
    return params


@pytest.mark.parametrize("entry", _local_params())
def test_sandboxctl_run_exits_two_naming_the_problem(
    entry: Entry, sandboxctl_results: dict[str, LocalRun]
) -> None:
    proc = sandboxctl_results[entry.name]
    assert "Traceback" not in proc.stderr, proc.stderr
    if entry.layer == "config":
        # The Secret only matters on a cluster; locally the key comes from OPENAI_API_KEY.
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert entry.local_expect in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("sandboxctl run: "), proc.stderr[:200]


# --- 3. the emulated cluster ------------------------------------------------------------------

CLUSTER_ENTRIES = [e for e in ENTRIES if creatable_on_a_cluster(e)]


def _cluster_name(entry: Entry) -> str:
    return f"bad-{entry.name}"[:63].rstrip("-")


def test_on_a_cluster_every_bad_task_fails_without_a_pod_and_the_operator_keeps_serving(
    k8s: EmulatedApiServer, kubelet: TestKubelet, run_operator: Any
) -> None:
    layers = {e.layer for e in CLUSTER_ENTRIES}
    assert {"model", "cluster", "config"} <= layers
    assert not any(e.layer.startswith("schema") for e in CLUSTER_ENTRIES)
    k8s.create(secret())
    with ScriptedLLMServer() as server:
        server.set_default(tool_call("submit", {"answer": "still serving"}))
        with run_operator(OPERATOR, env=operator_env(server)):
            for entry in CLUSTER_ENTRIES:
                doc = entry.doc()
                doc["metadata"] = {"name": _cluster_name(entry), "namespace": "default"}
                k8s.create(doc)
            k8s.create(task("good-after-bad-ones"))
            finals = {e.name: wait_phase(k8s, _cluster_name(e), TERMINAL) for e in CLUSTER_ENTRIES}
            good = wait_phase(k8s, "good-after-bad-ones", TERMINAL)
    problems = []
    for entry in CLUSTER_ENTRIES:
        st = finals[entry.name]
        want = "config_error" if entry.layer == "config" else "invalid_spec"
        got = (st.get("phase"), st.get("exitReason"))
        if got != ("Failed", want) or entry.expect not in st.get("message", ""):
            problems.append(f"{entry.name}: {got} {st.get('message')!r}")
        if want == "invalid_spec" and pods_of(k8s, _cluster_name(entry)):
            problems.append(f"{entry.name}: a pod was created")
    assert problems == []
    assert good["phase"] == "Succeeded", good
    assert good["answer"] == "still serving"
