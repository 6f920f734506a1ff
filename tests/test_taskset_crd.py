"""The SandboxTaskSet CRD: generated from the models, committed in sync, structural, and
accepting the examples."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from crdschema import open_api, validator_for
from sandbox_agent.taskset import parse_set
from sandbox_operator.crd import set_crd_manifest, set_crd_yaml
from test_crd import structural_problems

ROOT = Path(__file__).parent.parent
COMMITTED = [
    ROOT / "manifests" / "crd-taskset.yaml",
    ROOT / "charts" / "llm-sandbox" / "crds" / "sandboxtasksets.llmsandbox.io.yaml",
]
EXAMPLES = sorted((ROOT / "examples").glob("taskset-*.yaml"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_committed_set_crd_is_the_generated_one(path: Path) -> None:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run scripts/gen-crd.sh"
    assert path.read_text() == set_crd_yaml(), (
        f"{path.relative_to(ROOT)} is stale: run scripts/gen-crd.sh"
    )


def test_the_set_crd_is_structural_and_valid_for_kubernetes() -> None:
    assert structural_problems(open_api(set_crd_manifest())) == []
    assert kubernetes_validate.validate(set_crd_manifest(), "1.31", strict=True) == "1.31"


def test_the_set_crd_prints_items_done_accuracy_tokens_and_age() -> None:
    version = set_crd_manifest()["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Items", "Done", "Accuracy", "Tokens", "Age"]
    assert set_crd_manifest()["spec"]["names"]["shortNames"] == ["stset"]


def test_the_spec_of_a_set_cannot_change_once_created() -> None:
    rules = open_api(set_crd_manifest())["properties"]["spec"]["x-kubernetes-validations"]
    assert [r["rule"] for r in rules] == ["self == oldSelf"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_set_example_is_accepted_by_the_schema_and_the_model(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    validator = validator_for(set_crd_manifest())
    assert [e.message for e in validator.iter_errors(doc)] == []
    taskset = parse_set(doc)
    assert taskset.spec.items is not None
    assert len(taskset.spec.items) == 3
    dumped = taskset.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert [e.message for e in validator.iter_errors(dumped)] == []


def test_the_schema_keeps_an_items_own_fields_as_its_vars() -> None:
    # `a: 3` is not an item field: the server keeps it (the model reads it as a var).
    item = open_api(set_crd_manifest())["properties"]["spec"]["properties"]["items"]["items"]
    assert item["x-kubernetes-preserve-unknown-fields"] is True
