"""Where a task pod runs and what it pulls with: the operator's scheduling and pull secrets with
the task's merged in, as tables of (operator's, task's, result), and every refusal's one line."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from conftest import operator_settings
from k8s.workload import short_task
from sandbox_agent.errors import TaskSpecError
from sandbox_agent.result import ExitReason, Phase
from sandbox_agent.scheduling import Scheduling
from sandbox_agent.task import SandboxTask, parse_task
from sandbox_operator import decisions as decide
from sandbox_operator.decisions import WriteStatus
from sandbox_operator.errors import SpecError
from sandbox_operator.placement import merge_scheduling, task_scheduling
from sandbox_operator.pull_secrets import image_pull_secrets
from sandbox_operator.records import TaskRecord
from sandbox_operator.settings import OperatorSettings

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
EVERY_FIELD = [
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "topologySpreadConstraints",
]


def scheduling(**fields: Any) -> Scheduling:
    return Scheduling.model_validate(fields)


def task(**spec: Any) -> SandboxTask:
    return parse_task(short_task("t", **spec))


def node_term(*expressions: tuple[str, str, list[str]]) -> dict[str, Any]:
    return {
        "matchExpressions": [
            {"key": key, "operator": op, "values": values} for key, op, values in expressions
        ]
    }


def required_nodes(*terms: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
        }
    }


SANDBOX_TAINT = {"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}
SPOT_TAINT = {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
ZONE_SPREAD = {
    "maxSkew": 1,
    "topologyKey": "topology.kubernetes.io/zone",
    "whenUnsatisfiable": "ScheduleAnyway",
}
HOST_SPREAD = {
    "maxSkew": 2,
    "topologyKey": "kubernetes.io/hostname",
    "whenUnsatisfiable": "DoNotSchedule",
}
AWAY_FROM_DB = {
    "labelSelector": {"matchLabels": {"app": "db"}},
    "topologyKey": "kubernetes.io/hostname",
}
NEAR_CACHE = {
    "labelSelector": {"matchLabels": {"app": "cache"}},
    "topologyKey": "topology.kubernetes.io/zone",
}


# -- the merge rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "given", "expected"),
    [
        pytest.param({}, {}, {}, id="neither-sets-anything"),
        pytest.param(
            {"nodeSelector": {"pool": "sandbox"}, "priorityClassName": "batch-low"},
            {},
            {"nodeSelector": {"pool": "sandbox"}, "priorityClassName": "batch-low"},
            id="the-operators-alone",
        ),
        pytest.param(
            {},
            {"nodeSelector": {"disk": "ssd"}, "tolerations": [SPOT_TAINT]},
            {"nodeSelector": {"disk": "ssd"}, "tolerations": [SPOT_TAINT]},
            id="the-tasks-alone",
        ),
        pytest.param(
            {"nodeSelector": {"pool": "sandbox"}},
            {"nodeSelector": {"disk": "ssd", "pool": "sandbox"}},
            {"nodeSelector": {"pool": "sandbox", "disk": "ssd"}},
            id="node-selectors-are-merged-key-by-key",
        ),
        pytest.param(
            {"tolerations": [SANDBOX_TAINT]},
            {"tolerations": [SPOT_TAINT, SANDBOX_TAINT]},
            {"tolerations": [SANDBOX_TAINT, SPOT_TAINT]},
            id="tolerations-are-the-operators-then-the-tasks-each-once",
        ),
        pytest.param(
            {
                "affinity": required_nodes(
                    node_term(("pool", "In", ["a"])), node_term(("pool", "In", ["b"]))
                )
            },
            {"affinity": required_nodes(node_term(("disk", "In", ["ssd"])))},
            {
                "affinity": required_nodes(
                    node_term(("pool", "In", ["a"]), ("disk", "In", ["ssd"])),
                    node_term(("pool", "In", ["b"]), ("disk", "In", ["ssd"])),
                )
            },
            id="required-node-terms-must-both-hold-pair-by-pair",
        ),
        pytest.param(
            {"affinity": required_nodes(node_term(("pool", "In", ["a"])))},
            {
                "affinity": {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [AWAY_FROM_DB]
                    }
                }
            },
            {
                "affinity": {
                    **required_nodes(node_term(("pool", "In", ["a"]))),
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [AWAY_FROM_DB]
                    },
                }
            },
            id="affinities-of-different-kinds-are-both-kept",
        ),
        pytest.param(
            {
                "affinity": {
                    "podAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 10, "podAffinityTerm": NEAR_CACHE}
                        ]
                    }
                }
            },
            {
                "affinity": {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [NEAR_CACHE],
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 50, "podAffinityTerm": AWAY_FROM_DB}
                        ],
                    }
                }
            },
            {
                "affinity": {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [NEAR_CACHE],
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 10, "podAffinityTerm": NEAR_CACHE},
                            {"weight": 50, "podAffinityTerm": AWAY_FROM_DB},
                        ],
                    }
                }
            },
            id="pod-affinity-terms-are-joined",
        ),
        pytest.param(
            {"priorityClassName": "batch-low", "topologySpreadConstraints": [ZONE_SPREAD]},
            {"priorityClassName": "batch-high", "topologySpreadConstraints": [HOST_SPREAD]},
            {"priorityClassName": "batch-high", "topologySpreadConstraints": [HOST_SPREAD]},
            id="priority-and-spread-are-the-tasks-when-given",
        ),
        pytest.param(
            {"priorityClassName": "batch-low", "topologySpreadConstraints": [ZONE_SPREAD]},
            {"nodeSelector": {"disk": "ssd"}},
            {
                "nodeSelector": {"disk": "ssd"},
                "priorityClassName": "batch-low",
                "topologySpreadConstraints": [ZONE_SPREAD],
            },
            id="priority-and-spread-are-the-operators-otherwise",
        ),
    ],
)
def test_the_merge_rule(
    operator: dict[str, Any], given: dict[str, Any], expected: dict[str, Any]
) -> None:
    merged = merge_scheduling(scheduling(**operator), scheduling(**given))
    assert merged.pod_fields() == expected


def test_a_task_may_not_give_a_node_label_the_operator_sets_another_value() -> None:
    with pytest.raises(SpecError) as info:
        merge_scheduling(
            scheduling(nodeSelector={"pool": "sandbox"}), scheduling(nodeSelector={"pool": "gpu"})
        )
    assert str(info.value) == (
        "spec.scheduling.nodeSelector.pool: 'gpu' is not allowed: the operator runs every task "
        "pod on nodes with pool=sandbox (LLMSANDBOX_TASK_SCHEDULING)"
    )


def test_the_merge_neither_changes_its_inputs_nor_caps_what_they_make() -> None:
    terms = [node_term((f"k{i}", "Exists", [])) for i in range(16)]
    operator, given = (
        scheduling(affinity=required_nodes(*terms)),
        scheduling(affinity=required_nodes(*terms)),
    )
    before = (operator.pod_fields(), given.pod_fields())
    merged = merge_scheduling(operator, given).pod_fields()
    nodes = merged["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert len(nodes["nodeSelectorTerms"]) == 256
    assert (operator.pod_fields(), given.pod_fields()) == before


# -- which fields a task may set --------------------------------------------------------------


def test_by_default_a_task_may_narrow_where_it_runs_but_not_tolerate_or_outrank() -> None:
    settings = operator_settings()
    narrowing = task(
        scheduling={
            "nodeSelector": {"disk": "ssd"},
            "affinity": {
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [AWAY_FROM_DB]
                }
            },
            "topologySpreadConstraints": [ZONE_SPREAD],
        }
    )
    assert task_scheduling(narrowing, settings).given() == [
        "nodeSelector",
        "affinity",
        "topologySpreadConstraints",
    ]
    for field, value in (("tolerations", [SPOT_TAINT]), ("priorityClassName", "batch-high")):
        with pytest.raises(SpecError) as info:
            task_scheduling(task(scheduling={field: value}), settings)
        assert str(info.value) == (
            f"spec.scheduling.{field}: tasks may not set it on this cluster: the operator lets "
            "them set only nodeSelector, affinity, topologySpreadConstraints "
            "(LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS)"
        )


def test_an_admin_may_forbid_every_scheduling_field() -> None:
    settings = operator_settings(allowed_scheduling_fields=[])
    assert task_scheduling(task(), settings).pod_fields() == {}
    with pytest.raises(SpecError) as info:
        task_scheduling(task(scheduling={"nodeSelector": {"disk": "ssd"}}), settings)
    assert str(info.value) == (
        "spec.scheduling.nodeSelector: tasks may not set it on this cluster: the operator lets "
        "them set none of spec.scheduling (LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS)"
    )


def test_an_empty_field_is_not_a_field_set() -> None:
    settings = operator_settings(allowed_scheduling_fields=[])
    empty = task(scheduling={"nodeSelector": {}, "tolerations": []})
    assert task_scheduling(empty, settings).pod_fields() == {}


def test_a_refused_scheduling_field_ends_the_task_invalid_spec_before_any_pod() -> None:
    settings = operator_settings()
    body = short_task("t", scheduling={"tolerations": [SPOT_TAINT]})
    body["metadata"].update(uid="uid-t", generation=1, creationTimestamp="2026-03-01T11:59:00Z")
    [write] = decide.reconcile(TaskRecord.parse(body), None, NOW, settings)
    assert isinstance(write, WriteStatus)
    assert (write.status.phase, write.status.exit_reason) == (Phase.FAILED, ExitReason.INVALID_SPEC)
    assert (write.status.message or "").startswith(
        "spec.scheduling.tolerations: tasks may not set it on this cluster"
    )


# -- image pull secrets -----------------------------------------------------------------------


def pull_settings(operator: list[str], allowed: list[str]) -> OperatorSettings:
    return operator_settings(
        task_image_pull_secrets=[{"name": name} for name in operator],
        allowed_image_pull_secrets=allowed,
    )


@pytest.mark.parametrize(
    ("operator", "allowed", "given", "expected"),
    [
        pytest.param([], [], [], [], id="none"),
        pytest.param(["regcred"], [], [], ["regcred"], id="the-operators-on-every-pod"),
        pytest.param(["regcred", "regcred"], [], [], ["regcred"], id="each-once"),
        pytest.param(
            ["regcred"], ["team-a"], ["team-a"], ["regcred", "team-a"], id="an-allowed-one-is-added"
        ),
        pytest.param(["regcred"], [], ["regcred"], ["regcred"], id="the-operators-own-is-no-news"),
        pytest.param(
            [],
            ["team-a", "team-b"],
            ["team-b", "team-a", "team-b"],
            ["team-b", "team-a"],
            id="in-order",
        ),
    ],
)
def test_pull_secrets_are_the_operators_then_the_tasks_allowed_ones(
    operator: list[str], allowed: list[str], given: list[str], expected: list[str]
) -> None:
    spec_task = task(sandbox={"imagePullSecrets": [{"name": name} for name in given]})
    assert image_pull_secrets(spec_task, pull_settings(operator, allowed)) == expected


@pytest.mark.parametrize(
    ("allowed", "lets"),
    [([], "none"), (["team-a", "team-b"], "only team-a, team-b")],
    ids=["none-allowed", "others-allowed"],
)
def test_a_pull_secret_not_allowed_is_refused_naming_the_entry(
    allowed: list[str], lets: str
) -> None:
    names = [{"name": "regcred"}, {"name": "prod-registry"}]  # the operator's, then another
    with pytest.raises(SpecError) as info:
        image_pull_secrets(
            task(sandbox={"imagePullSecrets": names}), pull_settings(["regcred"], allowed)
        )
    assert str(info.value) == (
        "spec.sandbox.imagePullSecrets[1].name: 'prod-registry' is not a pull secret tasks may "
        f"use on this cluster: the operator lets them add {lets} "
        "(LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS)"
    )


# -- the shapes: nonsense is refused with its field path --------------------------------------


@pytest.mark.parametrize(
    ("scheduling_spec", "expected"),
    [
        (
            {"nodeSelector": {"Not A Key": "x"}},
            "spec.scheduling.nodeSelector: 'Not A Key' is not a label key",
        ),
        (
            {"nodeSelector": {"pool": "not a value"}},
            "spec.scheduling.nodeSelector.pool: must be a label value",
        ),
        (
            {"tolerations": [{"key": "a", "operator": "Equals"}]},
            "spec.scheduling.tolerations[0].operator: Input should be 'Exists' or 'Equal'",
        ),
        (
            {"tolerations": [{"key": "a", "effect": "NoRun"}]},
            "spec.scheduling.tolerations[0].effect: Input should be 'NoSchedule', "
            "'PreferNoSchedule' or 'NoExecute'",
        ),
        (
            {"tolerations": [{"value": "x"}]},
            "spec.scheduling.tolerations[0]: a toleration without key must have operator Exists",
        ),
        (
            {"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]},
            "spec.scheduling.tolerations[0]: operator Exists takes no value",
        ),
        (
            {"tolerations": [{"key": "a", "tolerationSeconds": 60}]},
            "spec.scheduling.tolerations[0]: tolerationSeconds needs effect NoExecute",
        ),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
                    }
                }
            },
            "spec.scheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms: List should have at least 1 item",
        ),
        (
            {"affinity": required_nodes(node_term(("pool", "In", [])))},
            "spec.scheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms[0].matchExpressions[0]: operator In needs at least one value",
        ),
        (
            {"affinity": required_nodes(node_term(("cores", "Gt", ["many"])))},
            "spec.scheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms[0].matchExpressions[0]: operator Gt takes exactly one value, an "
            "integer",
        ),
        (
            {"affinity": required_nodes({})},
            "spec.scheduling.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            ".nodeSelectorTerms[0]: a term needs matchExpressions or matchFields",
        ),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 0, "preference": node_term(("a", "Exists", []))}
                        ]
                    }
                }
            },
            "spec.scheduling.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution"
            "[0].weight: Input should be greater than or equal to 1",
        ),
        (
            {
                "affinity": {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]
                    }
                }
            },
            "spec.scheduling.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            "[0].topologyKey: Field required",
        ),
        (
            {
                "affinity": {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "topologyKey": "zone",
                                "labelSelector": {
                                    "matchExpressions": [
                                        {"key": "app", "operator": "Exists", "values": ["x"]}
                                    ]
                                },
                            }
                        ]
                    }
                }
            },
            "spec.scheduling.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution"
            "[0].labelSelector.matchExpressions[0]: operator Exists takes no values",
        ),
        (
            {"affinity": {"nodeAfinity": {}}},
            "spec.scheduling.affinity.nodeAfinity: unknown field (did you mean nodeAffinity?)",
        ),
        (
            {"priorityClassName": "High"},
            "spec.scheduling.priorityClassName: must be a DNS-1123 name",
        ),
        (
            {"topologySpreadConstraints": [{**ZONE_SPREAD, "maxSkew": 0}]},
            "spec.scheduling.topologySpreadConstraints[0].maxSkew: Input should be greater than "
            "or equal to 1",
        ),
        (
            {"topologySpreadConstraints": [{**ZONE_SPREAD, "minDomains": 2}]},
            "spec.scheduling.topologySpreadConstraints[0]: minDomains needs whenUnsatisfiable "
            "DoNotSchedule",
        ),
        (
            {"topologySpreadConstraints": [ZONE_SPREAD, {**ZONE_SPREAD, "maxSkew": 3}]},
            "spec.scheduling.topologySpreadConstraints: two constraints for topologyKey "
            "'topology.kubernetes.io/zone' with whenUnsatisfiable ScheduleAnyway",
        ),
        ({"tolerations": "all"}, "spec.scheduling.tolerations: Input should be a valid list"),
        (
            {"nodeSelector": ["pool=sandbox"]},
            "spec.scheduling.nodeSelector: must be a mapping",
        ),
    ],
)
def test_scheduling_nonsense_is_refused_with_its_field_path(
    scheduling_spec: dict[str, Any], expected: str
) -> None:
    with pytest.raises(TaskSpecError) as info:
        task(scheduling=scheduling_spec)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_a_pull_secret_is_a_secret_name() -> None:
    with pytest.raises(TaskSpecError) as info:
        task(sandbox={"imagePullSecrets": [{"name": "Team_A"}]})
    assert str(info.value).startswith(
        "spec.sandbox.imagePullSecrets[0].name: must be a DNS-1123 name"
    )
    with pytest.raises(TaskSpecError) as info:
        task(sandbox={"imagePullSecrets": ["team-a"]})
    assert str(info.value).startswith("spec.sandbox.imagePullSecrets[0]: must be a mapping")


def test_every_field_a_task_may_set_is_one_the_settings_name() -> None:
    assert list(Scheduling.model_validate({}).model_dump(by_alias=True)) == EVERY_FIELD
    assert (
        OperatorSettings.model_validate(
            {"allowed_scheduling_fields": EVERY_FIELD}
        ).allowed_scheduling_fields
        == EVERY_FIELD
    )


def test_placement_round_trips_through_the_wire_form() -> None:
    given = task(
        scheduling={
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [SPOT_TAINT],
            "affinity": required_nodes(node_term(("pool", "In", ["a"]))),
            "topologySpreadConstraints": [ZONE_SPREAD],
        },
        sandbox={"imagePullSecrets": [{"name": "team-a"}]},
    )
    dumped = given.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert parse_task(dumped) == given
    assert dumped["spec"]["scheduling"]["tolerations"] == [SPOT_TAINT]
