"""The SandboxTaskSet API: a task template, items (inline or JSONL), samples per item and a
grader; and the pure parts both runners share: the items read, each item-sample expanded to an
ordinary SandboxTask spec, and results summed into accuracy and pass@k."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from .apimodel import ApiModel
from .errors import TaskSpecError
from .graders import GraderSpec, Grading
from .result import ExitReason, Phase, is_scored
from .task import (
    MAX_PROMPT_CHARS,
    ConfigMapKeyRef,
    InputFile,
    ObjectMeta,
    SandboxTask,
    SandboxTaskSpec,
    format_validation_error,
    parse_document,
)

MAX_INLINE_ITEMS = 10_000
MAX_ITEMS = 1_000_000
MAX_ITEM_ID_CHARS = 253
# A child's name must also fit the pod names and labels derived from it.
MAX_CHILD_NAME = 63
# `{{ name }}`: an item's field in the template's prompt and inputs.
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# The paper's benchmark item fields, and what they are here.
PAPER_FIELDS = {"problem_statement": "prompt", "ground_truth": "expected", "input_files": "inputs"}
ITEM_FIELDS = ("id", "prompt", "expected", "inputs", "vars")

Scalar = str | int | float | bool


class SetItem(ApiModel):
    """One item: an id, its prompt (or fields for the template's), its expected answer and its
    input files. Written in the paper's shape too (problem_statement, ground_truth, input_files);
    any other field of an item is one of its vars."""

    id: Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID_CHARS)]
    prompt: Annotated[str | None, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] = None
    vars: dict[str, Scalar] = Field(default_factory=dict)
    expected: str | None = None
    inputs: list[InputFile] = Field(default_factory=list, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _paper_shape_and_vars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for paper, ours in PAPER_FIELDS.items():
            if paper in data:
                if ours in data:
                    raise ValueError(f"give {ours} or {paper}, not both")
                data[ours] = data.pop(paper)
        if isinstance(data.get("id"), int) and not isinstance(data.get("id"), bool):
            data["id"] = str(data["id"])
        if isinstance(data.get("expected"), int | float) and not isinstance(data["expected"], bool):
            data["expected"] = str(data["expected"])
        if "inputs" in data:
            data["inputs"] = _paper_inputs(data["inputs"])
        extra = {k: data.pop(k) for k in list(data) if k not in ITEM_FIELDS}
        if extra:
            given = data.get("vars")
            data["vars"] = {**extra, **(given if isinstance(given, dict) else {})}
        return data


def _paper_inputs(value: Any) -> Any:
    """input_files as the paper writes them: {name: content}, or a list of file paths (relative
    to the set file); a list of mappings is our own inputs."""
    if isinstance(value, dict):
        return [{"path": str(k), "content": v} for k, v in value.items()]
    if isinstance(value, list):
        return [{"path": Path(v).name, "file": v} if isinstance(v, str) else v for v in value]
    return value


class ItemsFrom(ApiModel):
    """Where a large set's items are: JSONL (one item per line), a JSON list, or Parquet."""

    config_map_key_ref: ConfigMapKeyRef | None = Field(
        default=None, description="A ConfigMap key holding JSONL (cluster)."
    )
    url: Annotated[str | None, Field(min_length=1, max_length=2048)] = Field(
        default=None,
        description="An artifact-store URL of the file: s3://, gs://, az:// or file://.",
    )
    file: Annotated[str | None, Field(min_length=1, max_length=4096)] = Field(
        default=None, description="Local mode only: a file relative to the set file."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ItemsFrom:
        given = [n for n in ("config_map_key_ref", "url", "file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of configMapKeyRef, url or file")
        if self.config_map_key_ref is not None and self.config_map_key_ref.key is None:
            raise ValueError("configMapKeyRef.key: name the key that holds the items")
        return self


class FailurePolicy(ApiModel):
    """When to stop a set whose tasks fail for reasons that are not the model's."""

    max_infrastructure_failure_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5,
        description=(
            "Stop creating tasks once more than this fraction of the finished ones failed for "
            "infrastructure reasons (1 never stops)."
        ),
    )
    min_finished: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=20, description="Judge the fraction only once this many tasks have finished."
    )


class TaskTemplate(SandboxTaskSpec):
    """A SandboxTask spec whose prompt and inputs may use `{{ field }}` of each item; its prompt
    may be left out when every item has its own."""

    prompt: Annotated[str | None, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _no_grading(self) -> TaskTemplate:
        if self.grading is not None:
            raise ValueError("grading: the set's grader and each item's expected grade its tasks")
        texts = [
            self.prompt or "",
            *(f"{f.path} {f.content or ''} {f.file or ''}" for f in self.inputs),
        ]
        if any("expected" in PLACEHOLDER.findall(text) for text in texts):
            raise ValueError("{{ expected }} would show the model the answer")
        return self


class SandboxTaskSetSpec(ApiModel):
    template: TaskTemplate = Field(default_factory=TaskTemplate)
    items: list[SetItem] | None = Field(default=None, max_length=MAX_INLINE_ITEMS)
    items_from: ItemsFrom | None = None
    samples_per_item: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=1, description="Rollouts per item (an RL group); pass@k is reported when > 1."
    )
    parallelism: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=10, description="At most this many of the set's tasks unfinished at once."
    )
    grader: GraderSpec | None = None
    ttl_seconds_after_finished: Annotated[int | None, Field(ge=0, le=365 * 86_400)] = Field(
        default=None, description="Delete the set and its tasks this long after it finished."
    )
    failure_policy: FailurePolicy = Field(default_factory=FailurePolicy)

    @model_validator(mode="after")
    def _one_source(self) -> SandboxTaskSetSpec:
        if (self.items is None) == (self.items_from is None):
            raise ValueError("set exactly one of items or itemsFrom")
        return self


class SandboxTaskSet(ApiModel):
    api_version: Literal["llmsandbox.io/v1alpha1"] = "llmsandbox.io/v1alpha1"
    kind: Literal["SandboxTaskSet"] = "SandboxTaskSet"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: SandboxTaskSetSpec
    status: dict[str, Any] | None = None

    @field_validator("metadata")
    @classmethod
    def _short_name(cls, meta: ObjectMeta) -> ObjectMeta:
        if meta.name is not None and len(meta.name) > 40:
            raise ValueError("name: at most 40 characters (its tasks are named SET-ITEM-SAMPLE)")
        return meta


def template_task(taskset: SandboxTaskSet) -> SandboxTask:
    """The set's template as one task (named as the set, a placeholder prompt): what the
    endpoint, the local model's context and the batch directory's name are decided from."""
    spec = taskset.spec.template.model_dump(by_alias=True, exclude_none=True)
    return SandboxTask(
        metadata=taskset.metadata,
        spec=SandboxTaskSpec.model_validate({**spec, "prompt": "-"}),
    )


def parse_set(data: object) -> SandboxTaskSet:
    """Validate a decoded set document; errors name the field path."""
    return parse_document(SandboxTaskSet, data, "set")


def parse_items(lines: Iterable[str], where: str) -> list[SetItem]:
    """Items from JSONL text (blank lines skipped); an error names `where`, the line and field.
    A JSON list (one document) is read too."""
    raw = list(lines)
    text = "".join(raw).lstrip()
    if text.startswith("["):
        try:
            docs = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskSpecError(f"{where}: not valid JSON: {exc}") from None
        return [_item(doc, f"{where}[{i}]") for i, doc in enumerate(docs)]
    items: list[SetItem] = []
    for number, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskSpecError(f"{where}: line {number}: not JSON: {exc.msg}") from None
        items.append(_item(doc, f"{where}: line {number}"))
        if len(items) > MAX_ITEMS:
            raise TaskSpecError(f"{where}: more than {MAX_ITEMS} items")
    return items


def _item(doc: object, where: str) -> SetItem:
    if not isinstance(doc, dict):
        raise TaskSpecError(f"{where}: an item must be a JSON object (got {type(doc).__name__})")
    try:
        return SetItem.model_validate(doc, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise TaskSpecError(format_validation_error(exc, where)) from None


def parquet_items(path: Path, where: str) -> list[SetItem]:
    """Items from a Parquet file's rows (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise TaskSpecError(
            f"{where}: reading Parquet needs pyarrow: pip install pyarrow"
        ) from None
    rows = pq.read_table(path).to_pylist()
    return [_item(row, f"{where}: row {i + 1}") for i, row in enumerate(rows)]


def check_items(spec: SandboxTaskSetSpec, items: list[SetItem]) -> None:
    """Items a set can run: unique ids, an expected answer for each when there is a grader, and
    every placeholder of the template filled. Every problem found is one line."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            problems.append(f"items[{i}].id: {item.id!r} repeats items[{seen[item.id]}]")
        seen.setdefault(item.id, i)
        if spec.grader is not None and item.expected is None:
            problems.append(f"items[{i}].expected: the {spec.grader.type} grader needs one")
        try:
            child_spec(spec, item, i)
        except TaskSpecError as exc:
            problems.append(str(exc))
        if len(problems) >= 20:
            problems.append("(more problems not shown)")
            break
    if not items:
        problems.append("items: the set has no items")
    if problems:
        raise TaskSpecError("\n".join(problems))


def _fields(item: SetItem) -> dict[str, str]:
    fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in item.vars.items()}
    fields["id"] = item.id
    if item.prompt is not None:
        fields["prompt"] = item.prompt
    return fields


def substitute(text: str, fields: dict[str, str], where: str) -> str:
    """`{{ name }}` replaced by the item's field; a missing field (or `expected`, which the model
    must never see) is an error naming `where`."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "expected":
            raise TaskSpecError(f"{where}: {{{{ expected }}}} would show the model the answer")
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise TaskSpecError(f"{where}: the item has no field {name!r} (it has {known})")
        return fields[name]

    return PLACEHOLDER.sub(one, text)


def child_spec(spec: SandboxTaskSetSpec, item: SetItem, index: int) -> SandboxTaskSpec:
    """The SandboxTask spec of one item: the template's with the item's fields put in, the item's
    prompt (unless the template's uses {{ prompt }}) and inputs, and the grading."""
    template = spec.template
    fields = _fields(item)
    where = f"items[{index}] ({item.id})"
    if template.prompt is not None and (item.prompt is None or "prompt" in _names(template.prompt)):
        prompt = substitute(template.prompt, fields, f"{where}: spec.template.prompt")
    elif item.prompt is not None:
        prompt = item.prompt
    else:
        raise TaskSpecError(f"{where}.prompt: the item has no prompt and the template none")
    inputs = [
        _filled_input(f, fields, f"{where}: spec.template.inputs[{i}]")
        for i, f in enumerate(template.inputs)
    ]
    data = template.model_dump(by_alias=True, exclude_none=True, exclude={"prompt", "inputs"})
    data["prompt"] = prompt
    data["inputs"] = [
        f.model_dump(by_alias=True, exclude_none=True) for f in [*inputs, *item.inputs]
    ]
    if spec.grader is not None and item.expected is not None:
        data["grading"] = Grading(grader=spec.grader, expected=item.expected).model_dump(
            by_alias=True, exclude_none=True
        )
    try:
        return SandboxTaskSpec.model_validate(data, by_alias=True, by_name=False)
    except ValidationError as exc:
        raise TaskSpecError(format_validation_error(exc, where)) from None


def _names(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def _filled_input(file: InputFile, fields: dict[str, str], where: str) -> InputFile:
    update: dict[str, str] = {"path": substitute(file.path, fields, f"{where}.path")}
    if file.content is not None:
        update["content"] = substitute(file.content, fields, f"{where}.content")
    if file.file is not None:
        update["file"] = substitute(file.file, fields, f"{where}.file")
    return file.model_copy(update=update)


def slug(text: str) -> str:
    """`text` as a DNS-1123 label part: lower case, [a-z0-9-], no dashes at the ends."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def item_keys(set_name: str, items: list[SetItem], samples: int) -> list[str]:
    """Each item's part of its tasks' names: its id as a name when that is one and unique,
    else a shortened slug with a hash of the id, so names are deterministic and never collide."""
    room = MAX_CHILD_NAME - len(set_name) - 2 - len(str(samples - 1))
    keys: list[str] = []
    plain = [slug(item.id) for item in items]
    counts: dict[str, int] = {}
    for key in plain:
        counts[key] = counts.get(key, 0) + 1
    for item, key in zip(items, plain, strict=True):
        if key == item.id and counts[key] == 1 and 0 < len(key) <= room:
            keys.append(key)
        else:
            digest = hashlib.sha256(item.id.encode()).hexdigest()[:8]
            head = key[: max(0, room - 9)].strip("-")
            keys.append(f"{head}-{digest}" if head else digest)
    return keys


@dataclass(frozen=True)
class Child:
    """One item-sample of a set: an ordinary task named SET-ITEM-SAMPLE."""

    index: int
    item_id: str
    sample: int
    name: str


def children(set_name: str, items: list[SetItem], samples: int) -> Iterator[Child]:
    """Every item-sample in the order they run: item by item, an item's samples together (an RL
    group finishes together)."""
    for index, (item, key) in enumerate(
        zip(items, item_keys(set_name, items, samples), strict=True)
    ):
        for sample in range(samples):
            yield Child(index, item.id, sample, f"{set_name}-{key}-{sample}")


@dataclass(frozen=True)
class SampleResult:
    """What a set's summary needs of one finished item-sample."""

    item_id: str
    sample: int
    phase: Phase
    exit_reason: ExitReason
    score: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None


class SetUsage(ApiModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = Field(default=None, alias="costUSD")


class SetSummary(ApiModel):
    """A set's results so far: counts, accuracy over the scored tasks, pass@k over the items."""

    tasks: int = 0
    finished: int = 0
    phases: dict[str, int] = Field(default_factory=dict)
    exit_reasons: dict[str, int] = Field(default_factory=dict)
    graded: int = 0
    accuracy: float | None = None
    pass_at_k: dict[str, float] = Field(default_factory=dict)
    infrastructure_failures: int = 0
    usage: SetUsage = Field(default_factory=SetUsage)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one item from n samples of which c passed (Chen et al., 2021):
    1 - C(n-c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples (got {n})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def k_values(samples: int) -> list[int]:
    """The k reported for a set: 1, the powers of two below samplesPerItem, and samplesPerItem."""
    ks = [1]
    while ks[-1] * 2 < samples:
        ks.append(ks[-1] * 2)
    if samples > 1:
        ks.append(samples)
    return ks


def summarise(results: Iterable[SampleResult], tasks: int, samples: int) -> SetSummary:
    """The summary of the finished results; a result passes when its score is 1. Infrastructure
    failures and cancellations are counted but never scored, and an item's pass@k uses only its
    scored samples (an item with fewer than k is left out of pass@k)."""
    summary = SetSummary(tasks=tasks)
    scores: list[float] = []
    per_item: dict[str, list[float]] = {}
    cost: float | None = None
    for r in results:
        summary.finished += 1
        summary.phases[r.phase] = summary.phases.get(r.phase, 0) + 1
        summary.exit_reasons[r.exit_reason] = summary.exit_reasons.get(r.exit_reason, 0) + 1
        if not is_scored(r.exit_reason) and r.exit_reason is not ExitReason.CANCELLED:
            summary.infrastructure_failures += 1
        if r.score is not None and is_scored(r.exit_reason):
            scores.append(r.score)
            per_item.setdefault(r.item_id, []).append(r.score)
        summary.usage.prompt_tokens += r.prompt_tokens
        summary.usage.completion_tokens += r.completion_tokens
        if r.cost_usd is not None:
            cost = (cost or 0.0) + r.cost_usd
    summary.usage.total_tokens = summary.usage.prompt_tokens + summary.usage.completion_tokens
    summary.usage.cost_usd = round(cost, 6) if cost is not None else None
    summary.graded = len(scores)
    if scores:
        summary.accuracy = round(sum(scores) / len(scores), 6)
    if samples > 1:
        summary.pass_at_k = pass_at_ks(per_item, samples)
    return summary


def pass_at_ks(per_item: dict[str, list[float]], samples: int) -> dict[str, float]:
    """pass@k for each reported k: the mean over the items with at least k scored samples."""
    found: dict[str, float] = {}
    for k in k_values(samples):
        values = [
            pass_at_k(len(s), sum(1 for x in s if x >= 1.0), k)
            for s in per_item.values()
            if len(s) >= k
        ]
        if values:
            found[str(k)] = round(sum(values) / len(values), 6)
    return found
