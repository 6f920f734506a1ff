"""The SandboxTask CRD: generated from the models, committed in sync, structural, and as strict as the model."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, Field

from crdschema import VALIDATOR, open_api, schema_path
from sandbox_agent.errors import TaskSpecError
from sandbox_agent.result import ExitReason, OutputFile, Phase, Usage
from sandbox_agent.task import MAX_PROMPT_CHARS, SandboxTaskSpec, parse_task
from sandbox_agent.wire import DEFAULT_SANDBOX_IMAGE
from sandbox_operator.cluster_cli import table
from sandbox_operator.crd import (
    SchemaConversionError,
    crd_manifest,
    crd_yaml,
    structural_schema,
)
from sandbox_operator.status import (
    ANSWER_SHORT_LIMIT,
    Condition,
    ConditionType,
    Reason,
    TaskStatus,
    answer_for_status,
    answer_short,
    parse_rfc3339,
    rfc3339,
    set_condition,
)

ROOT = Path(__file__).parent.parent
COMMITTED = [
    ROOT / "manifests" / "crd.yaml",
    ROOT / "charts" / "llm-sandbox" / "crds" / "sandboxtasks.llmsandbox.io.yaml",
]
# SandboxTask examples (the SandboxTaskSet ones are tests/test_taskset_crd.py's).
EXAMPLES = sorted(
    p for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("taskset-")
)
KUBERNETES_VERSIONS = ["1.29", "1.30", "1.31", "1.32", "1.33"]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted field path ([] for items, * for map values)."""
    nodes = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        nodes += walk(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        nodes += walk(node["items"], f"{path}[]")
    return nodes


# --- structural-schema rules (apiextensions.k8s.io/v1), as the API server applies them ----------

_JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
_NEVER = (
    "$ref",
    "$defs",
    "definitions",
    "dependencies",
    "patternProperties",
    "additionalItems",
    "id",
)
_NOT_IN_JUNCTORS = ("type", "description", "default", "additionalProperties", "nullable")


def structural_problems(  # noqa: C901 - one case per structural-schema rule
    node: dict[str, Any], path: str = "(root)", *, root: bool = True
) -> list[str]:
    problems: list[str] = []
    problems += [f"{path}: {key} is not supported" for key in _NEVER if key in node]
    untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-int-or-string"
    )
    if not node.get("type") and not untyped_ok:
        problems.append(f"{path}: no type")
    if node.get("type") == "null" or isinstance(node.get("type"), list):
        problems.append(f"{path}: type must be one OpenAPI type (use nullable for null)")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false (unknown fields are pruned instead)")
    if node.get("uniqueItems"):
        problems.append(f"{path}: uniqueItems (use x-kubernetes-list-type: set)")
    if "items" in node and not isinstance(node["items"], dict):
        problems.append(f"{path}: items must be one schema")
    if "default" in node and root:
        problems.append(f"{path}: no default at the root")
    if node.get("x-kubernetes-list-type") == "map":
        item = node.get("items", {})
        for key in node.get("x-kubernetes-list-map-keys", []):
            if key not in item.get("required", []) and "default" not in item.get(
                "properties", {}
            ).get(key, {}):
                problems.append(f"{path}: list-map key {key} must be required or defaulted")
    for junctor in _JUNCTORS:
        branches = node.get(junctor, [])
        for i, branch in enumerate(branches if isinstance(branches, list) else [branches]):
            where = f"{path}.{junctor}[{i}]"
            problems += [
                f"{where}: {key} inside a junctor" for key in _NOT_IN_JUNCTORS if key in branch
            ]
            problems += [
                f"{where}: property {name} not specified outside the junctor"
                for name in branch.get("properties", {})
                if name not in node.get("properties", {})
            ]
    if root and "metadata" in node.get("properties", {}):
        meta = node["properties"]["metadata"]
        if set(meta) - {"type", "properties"} or set(meta.get("properties", {})) - {
            "name",
            "generateName",
        }:
            problems.append(f"{path}.metadata: only name and generateName may be restricted")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}", root=False)
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*", root=False)
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]", root=False)
    return problems


# --- the generated CRD -------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_committed_crd_is_the_generated_one(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run scripts/gen-crd.sh"
    assert path.read_text() == crd_yaml(), (
        f"{path.relative_to(ROOT)} is stale: run scripts/gen-crd.sh"
    )


def test_the_crd_yaml_is_deterministic_and_parses_back_to_the_manifest() -> None:
    assert crd_yaml() == crd_yaml()
    assert yaml.safe_load(crd_yaml()) == crd_manifest()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_crd_is_a_valid_object_for_kubernetes(version: str) -> None:
    # strict: unknown keys anywhere in the CRD (including inside JSONSchemaProps) are errors.
    assert kubernetes_validate.validate(crd_manifest(), version, strict=True) == version


def test_the_schema_is_structural() -> None:
    assert structural_problems(open_api()) == []


def test_the_structural_checker_refuses_what_the_api_server_refuses() -> None:
    raw = SandboxTaskSpec.model_json_schema(by_alias=True, mode="validation")
    problems = "\n".join(structural_problems({"type": "object", "properties": {"spec": raw}}))
    assert "(root).spec: $defs is not supported" in problems
    assert "(root).spec.model: $ref is not supported" in problems
    assert "(root).spec: properties and additionalProperties are mutually exclusive" in problems
    assert structural_problems(
        {
            "type": "object",
            "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        }
    ) == [
        "(root).x: no type",
        "(root).x.anyOf[0]: type inside a junctor",
        "(root).x.anyOf[1]: type inside a junctor",
    ]


def test_nothing_pydantic_specific_survives_conversion() -> None:
    for path, node in walk(open_api()):
        assert "title" not in node, path
        assert not {"anyOf", "oneOf", "allOf", "$ref", "const"} & node.keys(), path
        for flag in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(flag, True) is True, f"{path}: {flag} must be the OpenAPI v3.0 flag"


def test_names_short_name_scope_and_status_subresource() -> None:
    spec = crd_manifest()["spec"]
    assert crd_manifest()["metadata"]["name"] == "sandboxtasks.llmsandbox.io"
    assert spec["group"] == "llmsandbox.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "SandboxTask",
        "listKind": "SandboxTaskList",
        "plural": "sandboxtasks",
        "singular": "sandboxtask",
        "shortNames": ["stask"],
        "categories": ["llmsandbox"],
    }
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns_point_at_fields_of_their_type() -> None:
    [version] = crd_manifest()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Steps", "Tokens", "Answer", "Reason", "Age"]
    assert columns["Answer"]["jsonPath"] == ".status.answerShort"
    assert columns["Reason"].get("priority") == 1
    assert all(c.get("priority", 0) == 0 for n, c in columns.items() if n != "Reason")
    assert columns["Age"] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }
    fields = dict(walk(open_api()))
    for name, column in columns.items():
        if name == "Age":
            continue
        field = fields[column["jsonPath"].removeprefix(".")]
        assert field["type"] == column["type"], name
    assert fields["status.answerShort"]["maxLength"] == ANSWER_SHORT_LIMIT <= 40


def test_patterns_are_re2_compatible() -> None:
    # The API server compiles patterns with Go's RE2: no look-around, backreferences or atomics.
    patterns = [n["pattern"] for _, n in walk(open_api()) if "pattern" in n]
    assert len(patterns) >= 5
    for pattern in patterns:
        assert not re.search(r"\(\?[=!<>]|\(\?<[=!]|\\[1-9]|[*+?}][+]", pattern), pattern
        re.compile(pattern)


def test_spec_defaults_are_the_models_safe_literals() -> None:
    defaults = {p: n["default"] for p, n in walk(open_api()) if "default" in n}
    assert defaults["spec.limits.maxSteps"] == 100
    assert defaults["spec.model.toolCallFormat"] == "auto"
    assert defaults["spec.sandbox.network.mode"] == "isolated"
    assert defaults["spec.model.apiKeySecretRef.key"] == "apiKey"
    # Deployment-specific, left to the operator; None defaults mean "unset", not a value.
    assert "spec.sandbox.image" not in defaults
    assert DEFAULT_SANDBOX_IMAGE not in defaults.values()
    assert "spec.model.temperature" not in defaults
    assert not [p for p in defaults if p.startswith("status")], "status has no server defaults"
    for path, node in walk(open_api()):
        if "default" in node:
            rule = {k: v for k, v in node.items() if k != "default"}
            jsonschema.Draft4Validator(rule).validate(node["default"])  # as the API server checks
            assert not isinstance(node["default"], dict | list), path


def test_status_enums_are_documented_not_enforced() -> None:
    # A newer operator's exit reasons must not be refused by an older CRD (Helm never upgrades crds/).
    fields = dict(walk(open_api()))
    exit_reason = fields["status.exitReason"]
    assert "enum" not in exit_reason
    assert all(r.value in exit_reason["description"] for r in ExitReason)
    assert "enum" in fields["spec.model.toolCallFormat"]


# --- the schema as a validator of documents ---------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_accepted(path: Path) -> None:
    doc = load(path)
    assert [e.message for e in VALIDATOR.iter_errors(doc)] == []
    # What the model makes of it (defaults filled in) is accepted too.
    task = parse_task(doc)
    dumped = task.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert [e.message for e in VALIDATOR.iter_errors(dumped)] == []


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = dotted.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()
BASE = {
    "apiVersion": "llmsandbox.io/v1alpha1",
    "kind": "SandboxTask",
    "metadata": {"name": "t"},
    "spec": {"prompt": "p"},
}


@pytest.mark.parametrize(
    ("field", "value", "rejected_by"),
    [
        ("spec.prompt", _DELETE, "spec:required"),
        ("spec.prompt", "x" * (MAX_PROMPT_CHARS + 1), "spec.prompt:maxLength"),
        ("spec.limits.maxSteps", 0, "spec.limits.maxSteps:minimum"),
        ("spec.model.toolCallFormat", "x", "spec.model.toolCallFormat:enum"),
        ("spec.model.topP", 0, "spec.model.topP:minimum"),
        (
            "spec.sandbox.resources.limits",
            {"memory": "2 GB"},
            "spec.sandbox.resources.limits.*:pattern",
        ),
        ("spec.sandbox.network.mode", "open", "spec.sandbox.network.mode:enum"),
        ("spec.inputs", [{"path": "/etc/passwd", "content": "x"}], "spec.inputs[].path:pattern"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 50 else "",
)
def test_invalid_specs_are_rejected_by_the_schema_and_the_model(
    field: str, value: Any, rejected_by: str
) -> None:
    doc = _set(BASE, field, value)
    errors = list(VALIDATOR.iter_errors(doc))
    assert [schema_path(e) for e in errors] == [rejected_by]
    with pytest.raises(TaskSpecError):
        parse_task(doc)


# --- the converter on shapes our models do not (yet) use --------------------------------------


class _Shapes(BaseModel):
    anything: Any = None
    free_form: dict[str, Any] = Field(default_factory=dict)
    tags: set[str] = Field(default_factory=set)
    ratio: float = Field(default=0.5, gt=0, lt=1)
    maybe: int | None = Field(default=None, ge=0)


def test_the_converter_maps_free_form_sets_and_exclusive_bounds() -> None:
    out = structural_schema(_Shapes.model_json_schema(), path="x")
    props = out["properties"]
    assert props["anything"] == {"x-kubernetes-preserve-unknown-fields": True}
    assert props["free_form"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert props["tags"]["x-kubernetes-list-type"] == "set"
    assert props["ratio"] == {
        "type": "number",
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
        "exclusiveMaximum": True,
        "default": 0.5,
    }
    assert props["maybe"] == {"type": "integer", "minimum": 0}
    assert structural_problems(out) == []


def test_the_converter_refuses_unions_it_cannot_express() -> None:
    class IntOrStr(BaseModel):
        value: int | str

    with pytest.raises(SchemaConversionError, match=r"x\.value: anyOf of several types"):
        structural_schema(IntOrStr.model_json_schema(), path="x")


# --- the status model -------------------------------------------------------------------------

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def full_status() -> TaskStatus:
    return TaskStatus(
        phase=Phase.SUCCEEDED,
        conditions=set_condition([], ConditionType.COMPLETE, "True", Reason.SUCCEEDED, "done", NOW),
        pod_name="aime-07-x7k2",
        attempt=1,
        start_time=rfc3339(NOW),
        completion_time=rfc3339(NOW + timedelta(seconds=90)),
        queued_seconds=1.5,
        run_seconds=88.25,
        exit_reason=ExitReason.SUBMITTED,
        answer="204",
        answer_truncated=False,
        answer_short="204",
        steps=17,
        usage=Usage(
            prompt_tokens=80123, completion_tokens=4410, total_tokens=84533, cost_usd=0.031
        ),
        tool_calls={"bash": 12, "submit": 1},
        outputs=[OutputFile(path="answer.txt", bytes=4)],
        observed_generation=1,
    )


def test_status_round_trips_through_camel_case_json() -> None:
    status = full_status()
    wire = status.to_api()
    assert {
        "podName",
        "exitReason",
        "answerShort",
        "observedGeneration",
        "toolCalls",
    } <= wire.keys()
    assert wire["usage"]["costUSD"] == 0.031
    assert wire["conditions"][0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert "queuePosition" not in wire, "unset fields are left out"
    assert TaskStatus.model_validate(wire) == status
    assert TaskStatus.model_validate_json(status.model_dump_json(by_alias=True)) == status


def test_status_parsing_ignores_fields_it_does_not_know() -> None:
    status = TaskStatus.model_validate({"phase": "Queued", "queuePosition": 3, "fromTheFuture": 1})
    assert (status.phase, status.queue_position) == (Phase.QUEUED, 3)


def test_the_written_status_is_accepted_by_the_crd() -> None:
    doc = {**BASE, "status": full_status().to_api()}
    assert [e.message for e in VALIDATOR.iter_errors(doc)] == []


def test_set_condition_adds_a_condition_at_now() -> None:
    conds = set_condition([], ConditionType.ADMITTED, "False", Reason.QUEUED, "3 ahead", NOW)
    assert conds == [
        Condition(
            type="Admitted",
            status="False",
            reason="Queued",
            message="3 ahead",
            last_transition_time="2025-01-02T03:04:05Z",
        )
    ]


def test_set_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    later = NOW + timedelta(minutes=5)
    first = set_condition([], ConditionType.ADMITTED, "False", Reason.QUEUED, "3 ahead", NOW)
    same = set_condition(first, ConditionType.ADMITTED, "False", Reason.QUEUED, "1 ahead", later)
    cond = next((c for c in same if c.type == ConditionType.ADMITTED), None)
    assert cond is not None
    assert (cond.message, cond.last_transition_time) == ("1 ahead", rfc3339(NOW))
    assert first[0].message == "3 ahead", "the input list is not modified"


def test_set_condition_moves_the_transition_time_when_the_status_flips() -> None:
    later = NOW + timedelta(minutes=5)
    conds = set_condition([], ConditionType.ADMITTED, "False", Reason.QUEUED, "", NOW)
    conds = set_condition(conds, ConditionType.READY, "True", Reason.RUNNING, "", NOW)
    conds = set_condition(conds, ConditionType.ADMITTED, "True", Reason.ADMITTED, "", later)
    assert [c.type for c in conds] == ["Admitted", "Ready"], "order and other conditions kept"
    assert conds[0].last_transition_time == rfc3339(later)
    assert conds[0].reason == "Admitted"
    assert conds[1].last_transition_time == rfc3339(NOW)


def test_parse_rfc3339_reads_what_rfc3339_writes_and_nothing_else() -> None:
    assert parse_rfc3339(rfc3339(NOW)) == NOW.replace(microsecond=0)
    assert parse_rfc3339("2026-03-01T12:00:00+02:00") == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert [parse_rfc3339(t) for t in (None, "", "yesterday")] == [None, None, None]


def test_a_task_with_an_unreadable_creation_time_shows_its_age_as_unknown() -> None:
    body = {"metadata": {"name": "t", "creationTimestamp": "not a time"}, "status": {}}
    assert table([body], all_namespaces=False).splitlines()[1].rstrip().endswith("?")


def test_rfc3339_is_utc_whole_seconds_and_refuses_naive_times() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert rfc3339(datetime(2025, 1, 2, 5, 4, 5, 999, tzinfo=plus_two)) == "2025-01-02T03:04:05Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        rfc3339(datetime(2025, 1, 2))


def test_condition_names_are_camel_case() -> None:
    for value in [*ConditionType, *Reason]:
        assert re.fullmatch(r"[A-Z][A-Za-z]*", value), value


def test_long_answers_are_cut_and_flagged() -> None:
    assert answer_for_status(None) == (None, False)
    assert answer_for_status("204") == ("204", False)
    assert answer_for_status("x" * 1024) == ("x" * 1024, False)
    assert answer_for_status("x" * 1025) == ("x" * 1024, True)
    assert answer_for_status("abcdef", limit=4) == ("abcd", True)


def test_the_short_answer_is_one_line_of_at_most_40_characters() -> None:
    assert answer_short(None) is None
    assert answer_short("  compressor 3,\n 261.5 ") == "compressor 3, 261.5"
    short = answer_short('{"count":8,"primes":[2,3,5,13,89,233,1597,28657]}')
    assert short is not None
    assert len(short) == 40
    assert short.endswith("…")
    TaskStatus(answer_short=short)  # fits the model's (and the CRD's) maxLength
