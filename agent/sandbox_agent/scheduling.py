"""Where a task's pod may run, in the shapes and names of the Kubernetes pod spec: node selector,
tolerations, affinity, priority class and topology spread constraints (`spec.scheduling`, and
the operator's own for every task pod). Checked as the API server checks them, so that a pod
built from them is never refused; only a cluster gives them meaning."""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .apimodel import ApiModel
from .wire import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, NAME_PATTERN

# A label key: a DNS-subdomain prefix (253) and '/', then a name of at most 63 characters.
MAX_LABEL_KEY = 253 + 1 + 63
LABEL_KEY_HELP = (
    "a label key: an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or "
    "'.', starting and ending with a letter or digit"
)
LABEL_VALUE_HELP = (
    "a label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
    "letter or digit"
)
LabelKey = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_KEY, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
Namespace = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]
Weight = Annotated[int, Field(ge=1, le=100)]
MAX_TERMS = 16
MAX_VALUES = 256
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_LABEL_VALUE = re.compile(LABEL_VALUE_PATTERN)


def _valid_label_keys(labels: dict[str, str]) -> dict[str, str]:
    """The keys of a label map (a CRD schema can constrain only its values)."""
    for key in labels:
        if len(key) > MAX_LABEL_KEY or not _LABEL_KEY.match(key):
            raise ValueError(f"{key!r} is not {LABEL_KEY_HELP}")
    return labels


def _values_for(operator: str, values: list[str]) -> None:
    """The values a requirement's operator takes, as the API server (and the scheduler, for Gt
    and Lt) holds them to."""
    if operator in ("In", "NotIn"):
        if not values:
            raise ValueError(f"operator {operator} needs at least one value")
        for value in values:
            if not _LABEL_VALUE.match(value):
                raise ValueError(f"{value!r} is not a label value, so no label can match it")
    if operator in ("Exists", "DoesNotExist") and values:
        raise ValueError(f"operator {operator} takes no values")
    if operator in ("Gt", "Lt") and (
        len(values) != 1 or not re.fullmatch(r"-?[0-9]{1,18}", values[0])
    ):
        raise ValueError(f"operator {operator} takes exactly one value, an integer")


class Toleration(ApiModel):
    """Lets the pod onto nodes with a matching taint (key, value, effect)."""

    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Equal when left out."
    )
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Every effect when left out."
    )
    toleration_seconds: int | None = Field(
        default=None, description="With effect NoExecute: how long the pod stays once tainted."
    )

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> Toleration:
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without key must have operator Exists")
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


NodeOperator = Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]


class NodeSelectorRequirement(ApiModel):
    key: LabelKey
    operator: NodeOperator
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list, max_length=MAX_VALUES
    )

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> NodeSelectorRequirement:
        _values_for(self.operator, self.values)
        return self


class NodeFieldRequirement(ApiModel):
    """A node's own fields: only metadata.name can be selected."""

    key: Literal["metadata.name"]
    operator: Literal["In", "NotIn"]
    values: list[Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]] = Field(
        min_length=1, max_length=1
    )


class NodeSelectorTerm(ApiModel):
    """Nodes matching every expression and field requirement."""

    match_expressions: list[NodeSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_TERMS
    )
    match_fields: list[NodeFieldRequirement] = Field(default_factory=list, max_length=MAX_TERMS)

    @model_validator(mode="after")
    def _selects_something(self) -> NodeSelectorTerm:
        if not self.match_expressions and not self.match_fields:
            raise ValueError(
                "a term needs matchExpressions or matchFields (an empty one matches no node)"
            )
        return self


class NodeSelector(ApiModel):
    """Nodes matching any of the terms."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=MAX_TERMS)


class PreferredSchedulingTerm(ApiModel):
    weight: Weight
    preference: NodeSelectorTerm


class NodeAffinity(ApiModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=MAX_TERMS
    )


class LabelSelectorRequirement(ApiModel):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] = Field(default_factory=list, max_length=MAX_VALUES)

    @model_validator(mode="after")
    def _values_fit_the_operator(self) -> LabelSelectorRequirement:
        _values_for(self.operator, self.values)
        return self


class LabelSelector(ApiModel):
    match_labels: dict[str, LabelValue] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=MAX_TERMS
    )

    _label_keys = field_validator("match_labels")(_valid_label_keys)


class PodAffinityTerm(ApiModel):
    """Pods matching the selector, in the namespaces given, on the same topologyKey domain."""

    label_selector: LabelSelector | None = None
    namespaces: list[Namespace] = Field(default_factory=list, max_length=MAX_VALUES)
    namespace_selector: LabelSelector | None = None
    topology_key: LabelKey
    match_label_keys: list[LabelKey] = Field(default_factory=list, max_length=MAX_TERMS)
    mismatch_label_keys: list[LabelKey] = Field(default_factory=list, max_length=MAX_TERMS)

    @model_validator(mode="after")
    def _label_keys_need_a_selector(self) -> PodAffinityTerm:
        if (self.match_label_keys or self.mismatch_label_keys) and self.label_selector is None:
            raise ValueError("matchLabelKeys and mismatchLabelKeys need a labelSelector")
        return self


class WeightedPodAffinityTerm(ApiModel):
    weight: Weight
    pod_affinity_term: PodAffinityTerm


class PodAffinity(ApiModel):
    """Pod affinity or, under podAntiAffinity, the pods to keep away from."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_TERMS
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=MAX_TERMS
    )


class Affinity(ApiModel):
    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


class TopologySpreadConstraint(ApiModel):
    max_skew: Annotated[int, Field(ge=1)]
    topology_key: LabelKey
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    label_selector: LabelSelector | None = None
    min_domains: Annotated[int | None, Field(ge=1)] = None
    node_affinity_policy: Literal["Honor", "Ignore"] | None = None
    node_taints_policy: Literal["Honor", "Ignore"] | None = None
    match_label_keys: list[LabelKey] = Field(default_factory=list, max_length=MAX_TERMS)

    @model_validator(mode="after")
    def _as_the_api_server_checks(self) -> TopologySpreadConstraint:
        if self.min_domains is not None and self.when_unsatisfiable != "DoNotSchedule":
            raise ValueError("minDomains needs whenUnsatisfiable DoNotSchedule")
        if self.match_label_keys and self.label_selector is None:
            raise ValueError("matchLabelKeys needs a labelSelector")
        return self


# The fields of Scheduling as the pod spec (and a task) names them.
SchedulingField = Literal[
    "nodeSelector", "tolerations", "affinity", "priorityClassName", "topologySpreadConstraints"
]
SCHEDULING_FIELDS: tuple[SchedulingField, ...] = typing.get_args(SchedulingField)


class Scheduling(ApiModel):
    """The pod spec's scheduling fields; each is left out of the pod when not given."""

    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Node labels the node must have."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    affinity: Affinity | None = None
    priority_class_name: Annotated[str | None, Field(max_length=253, pattern=NAME_PATTERN)] = None
    topology_spread_constraints: list[TopologySpreadConstraint] = Field(
        default_factory=list, max_length=MAX_TERMS
    )

    _label_keys = field_validator("node_selector")(_valid_label_keys)

    @field_validator("topology_spread_constraints")
    @classmethod
    def _one_constraint_per_key_and_policy(
        cls, constraints: list[TopologySpreadConstraint]
    ) -> list[TopologySpreadConstraint]:
        seen: set[tuple[str, str]] = set()
        for constraint in constraints:
            pair = (constraint.topology_key, constraint.when_unsatisfiable)
            if pair in seen:
                raise ValueError(
                    f"two constraints for topologyKey {pair[0]!r} with whenUnsatisfiable "
                    f"{pair[1]}: Kubernetes allows one"
                )
            seen.add(pair)
        return constraints

    def pod_fields(self) -> dict[str, Any]:
        """The pod spec fields this sets, as Kubernetes names them; unset ones are left out."""
        fields = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return {name: value for name, value in fields.items() if value not in ({}, [])}

    def given(self) -> list[SchedulingField]:
        """The fields this sets, in the order of SCHEDULING_FIELDS."""
        fields = self.pod_fields()
        return [name for name in SCHEDULING_FIELDS if name in fields]
