"""The SandboxTask model: what a task file may say, and the errors it gets when it is wrong."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sandbox_agent.errors import TaskSpecError
from sandbox_agent.quantity import parse_quantity
from sandbox_agent.task import NetworkMode, ToolCallFormat, parse_task
from sandbox_agent.taskfile import load_task_file

EXAMPLES = sorted(
    p
    for p in (Path(__file__).parent.parent / "examples").glob("*.yaml")
    if not p.name.startswith("taskset-")  # sets: tests/test_taskset_crd.py
)


def doc(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "llmsandbox.io/v1alpha1", "kind": "SandboxTask", "spec": spec}


def error_of(data: Any) -> str:
    with pytest.raises(TaskSpecError) as info:
        parse_task(data)
    return str(info.value)


def test_a_minimal_task_gets_sane_defaults() -> None:
    task = parse_task(doc(prompt="hi"))
    assert task.spec.limits.max_steps == 100
    assert task.spec.limits.command_timeout_seconds == 120
    assert task.spec.model.tool_call_format is ToolCallFormat.AUTO
    assert task.spec.sandbox.network.mode is NetworkMode.ISOLATED
    assert task.spec.retries == 1


def test_wire_names_are_camel_case_and_round_trip() -> None:
    data = doc(
        prompt="p",
        model={"name": "m", "baseURL": "http://h:8000/v1", "maxTokensPerCall": 512},
        limits={"maxSteps": 5, "activeDeadlineSeconds": 60},
        sandbox={"resources": {"limits": {"memory": "2Gi", "ephemeral-storage": "4Gi"}}},
    )
    task = parse_task(data)
    assert task.spec.model.base_url == "http://h:8000/v1"
    dumped = task.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spec"]["model"]["baseURL"] == "http://h:8000/v1"
    assert dumped["spec"]["limits"]["maxSteps"] == 5
    assert parse_task(dumped) == task


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "spec.prompt: Field required"),
        ({"prompt": ""}, "spec.prompt: String should have at least 1 character"),
        ({"prompt": 5}, "spec.prompt: Input should be a valid string"),
        (
            {"prompt": "p", "limits": {"maxSteps": 0}},
            "spec.limits.maxSteps: Input should be greater than or equal to 1",
        ),
        (
            {"prompt": "p", "limits": {"maxSteps": "many"}},
            "spec.limits.maxSteps: Input should be a valid integer",
        ),
        ({"prompt": "p", "limits": {"maxStep": 3}}, "spec.limits.maxStep: unknown field"),
        ({"prompt": "p", "bogus": 1}, "spec.bogus: unknown field"),
        (
            {"prompt": "p", "model": {"toolCallFormat": "json"}},
            "spec.model.toolCallFormat: Input should be 'native', 'hermes', 'auto' or 'bash'",
        ),
        (
            {"prompt": "p", "model": {"baseURL": "vllm:8000"}},
            "spec.model.baseURL: String should match pattern",
        ),
        (
            {"prompt": "p", "inputs": [{"path": "../etc/passwd", "content": "x"}]},
            "spec.inputs[0].path: '../etc/passwd' escapes /workspace/input",
        ),
        (
            {"prompt": "p", "inputs": [{"path": "/abs", "content": "x"}]},
            "spec.inputs[0].path: must be a relative path",
        ),
        (
            {"prompt": "p", "inputs": [{"path": "a"}]},
            "spec.inputs[0]: set exactly one of content, file or configMapRef (got none)",
        ),
        (
            {
                "prompt": "p",
                "inputs": [{"path": "a", "content": "x"}, {"path": "a", "content": "y"}],
            },
            "spec.inputs: duplicate input path 'a'",
        ),
        (
            {"prompt": "p", "sandbox": {"resources": {"limits": {"memory": "lots"}}}},
            "spec.sandbox.resources.limits.memory: must be a Kubernetes quantity",
        ),
        (
            {"prompt": "p", "sandbox": {"resources": {"limits": {"gpu": "1"}}}},
            "spec.sandbox.resources.limits: unknown resource 'gpu'",
        ),
        (
            {"prompt": "p", "sandbox": {"network": {"mode": "everything"}}},
            "spec.sandbox.network.mode: Input should be",
        ),
        (
            {"prompt": "p", "sandbox": {"network": {"mode": "allowList"}}},
            "spec.sandbox.network: mode allowList needs at least one entry",
        ),
        (
            {
                "prompt": "p",
                "sandbox": {"network": {"mode": "allowList", "allow": ["example.com"]}},
            },
            "spec.sandbox.network.allow[0]: must be ADDRESS[/PREFIX]:PORT",
        ),
        (
            {"prompt": "p", "retries": -1},
            "spec.retries: Input should be greater than or equal to 0",
        ),
        (
            {"prompt": "p", "queueName": "Team_A"},
            "spec.queueName: must be a DNS-1123 name: lower-case letters, digits, '-' and '.'",
        ),
        (
            {"prompt": "p", "queueName": "q" * 64},
            "spec.queueName: String should have at most 63 characters",
        ),
        ({"prompt": "p" * 300_000}, "spec.prompt: String should have at most 262144 characters"),
        (
            {"prompt": "p", "sandbox": {"network": "open"}},
            "spec.sandbox.network: must be a mapping {mode: isolated|internet|allowList, "
            "allow: [CIDR:PORT, ...]} (got 'open')",
        ),
        ({"prompt": "p", "model": "gpt-4o"}, "spec.model: must be a mapping {name: ..., baseURL:"),
        ({"prompt": "p", "inputs": ["a.txt"]}, "spec.inputs[0]: must be a mapping (got 'a.txt')"),
    ],
)
def test_invalid_specs_are_rejected_with_the_field_path(
    spec: dict[str, Any], expected: str
) -> None:
    assert expected in error_of(doc(**spec))


def test_wrong_api_version_and_non_mapping_documents_are_rejected() -> None:
    assert "apiVersion" in error_of(
        {"apiVersion": "v1", "kind": "SandboxTask", "spec": {"prompt": "p"}}
    )
    assert "must be a mapping" in error_of(["a", "list"])


def test_task_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(TaskSpecError, match="nope.yaml: no such task file"):
        load_task_file(missing)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("spec: [unclosed\n")
    with pytest.raises(TaskSpecError, match="bad.yaml: invalid YAML"):
        load_task_file(bad_yaml)
    two = tmp_path / "two.yaml"
    two.write_text("spec: {prompt: a}\n---\nspec: {prompt: b}\n")
    with pytest.raises(TaskSpecError, match="exactly one YAML document, found 2"):
        load_task_file(two)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("spec: {prompt: a, limits: {maxSteps: -3}}\n")
    with pytest.raises(
        TaskSpecError, match=r"wrong.yaml: invalid SandboxTask:\nspec.limits.maxSteps"
    ):
        load_task_file(wrong)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_task(path: Path) -> None:
    task = load_task_file(path)
    assert task.metadata.name == path.stem
    for item in task.spec.inputs:
        if item.file is not None:
            assert (path.parent / item.file).is_file()


def test_examples_cover_code_long_document_and_strict_format() -> None:
    assert {p.stem for p in EXAMPLES} >= {"maths-by-code", "long-document", "strict-format"}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"),
        ("2", "2"),
        ("1.5", "1.5"),
        ("512Mi", str(512 * 2**20)),
        ("4G", "4000000000"),
        ("1e3", "1000"),
    ],
)
def test_quantities_parse_to_base_units(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


def test_a_bad_quantity_names_itself() -> None:
    with pytest.raises(ValueError, match="'12 GB' is not a Kubernetes quantity"):
        parse_quantity("12 GB")


def test_a_mapping_error_never_shows_the_models_class_name() -> None:
    message = error_of(doc(prompt="p", sandbox={"network": "open"}))
    assert "instance of" not in message
    assert "Network" not in message


def test_an_unknown_field_suggests_the_closest_name_at_its_place() -> None:
    message = error_of(
        doc(
            promt="p",
            limits={"maxStep": 3},
            sandbox={"imag": "x", "network": {"mod": "isolated"}},
            inputs=[{"path": "a", "contnt": "b"}],
        )
    )
    for line in (
        "spec.promt: unknown field (did you mean prompt?)",
        "spec.limits.maxStep: unknown field (did you mean maxSteps?)",
        "spec.sandbox.imag: unknown field (did you mean image?)",
        "spec.sandbox.network.mod: unknown field (did you mean mode?)",
        "spec.inputs[0].contnt: unknown field (did you mean content?)",
        "spec.prompt: Field required",  # every problem is listed, not only the first
    ):
        assert line in message.splitlines()
    far = error_of(doc(prompt="p", zzzzzz=1))
    assert "spec.zzzzzz: unknown field" in far.splitlines()


GOOD_IMAGES = [
    "python:3.12-slim",
    "llm-sandbox/sandbox-python:0.1.0",
    "registry.example.com:5000/team/sandbox:v1",
    "localhost/sandbox",
    "[::1]:5000/sandbox:latest",
    "ghcr.io/org/my_image__x.y-z:1.0_rc.2",
    "busybox@sha256:" + "ab" * 32,
    "busybox:1.36@sha256:" + "ab" * 32,
]
BAD_IMAGES = [
    "UPPER::bad@@",
    "Python:3.12",
    "python 3.12",
    "python:",
    "python:-dash",
    "/python",
    "python/",
    "a//b",
    "python@sha256:short",
    "python:" + "t" * 129,
]


@pytest.mark.parametrize("image", GOOD_IMAGES)
def test_image_references_the_container_tools_accept_are_accepted(image: str) -> None:
    assert parse_task(doc(prompt="p", sandbox={"image": image})).spec.sandbox.image == image


@pytest.mark.parametrize("image", BAD_IMAGES)
def test_an_image_reference_outside_the_grammar_is_refused_in_words(image: str) -> None:
    message = error_of(doc(prompt="p", sandbox={"image": image}))
    shown = image if len(image) <= 80 else image[:77] + "..."
    assert message.splitlines()[-1] == (
        f"spec.sandbox.image: {shown!r} is not an image reference: expected "
        "[REGISTRY[:PORT]/]NAME[:TAG][@DIGEST], NAME in lower case (for example "
        "python:3.12-slim or registry.example.com/team/sandbox:v1)"
    )


def test_an_image_name_over_255_characters_is_refused() -> None:
    message = error_of(doc(prompt="p", sandbox={"image": "a" * 256 + ":1"}))
    assert "spec.sandbox.image: the image name is longer than 255 characters" in message
