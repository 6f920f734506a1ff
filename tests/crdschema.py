"""The generated CRD's schema as a JSON Schema validator, for tests that check what the API
server would accept (it validates with the same OpenAPI rules)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jsonschema

from sandbox_operator.crd import crd_manifest


def open_api(manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of `manifest` (the SandboxTask CRD when none is given)."""
    crd = crd_manifest() if manifest is None else manifest
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def as_jsonschema(node: Any) -> Any:
    """OpenAPI v3.0 to JSON Schema Draft 4: only `nullable` differs in what we emit."""
    if isinstance(node, list):
        return [as_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    return out


# The CEL rules the schema carries, all of the one form `self.matches(r'RE2')`; the expression
# is written so that Python's re reads it as RE2 does.
_MATCHES = re.compile(r"self\.matches\(r'([^']*)'\)")


def _cel_rules(
    validator: Any, rules: list[dict[str, str]], instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: the server evaluates it on updates only
        found = _MATCHES.fullmatch(rule["rule"])
        if found is None:
            # Deliberate: a rule of another form must be taught to this checker, not skipped.
            raise ValueError(f"crdschema evaluates only self.matches(r'...') rules: {rule['rule']}")
        if isinstance(instance, str) and re.search(found.group(1), instance) is None:
            yield jsonschema.ValidationError(rule["message"])


_Validator = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft4Validator, {"x-kubernetes-validations": _cel_rules}
)


def validator_for(manifest: dict[str, Any] | None = None) -> Any:
    """What the API server accepts on create for `manifest`'s objects (the SandboxTask CRD's by
    default): its schema and its CEL rules."""
    return _Validator(as_jsonschema(open_api(manifest)))


VALIDATOR = validator_for()


def schema_path(error: jsonschema.ValidationError) -> str:
    """The rejecting rule as spec.limits.maxSteps:minimum ([] = list item, * = map value)."""
    *where, keyword = error.absolute_schema_path
    path = ""
    for part in where:
        if part == "items":
            path += "[]"
        elif part == "additionalProperties":
            path += ".*"
        elif part != "properties":
            path += f".{part}" if path else str(part)
    return f"{path or '(root)'}:{keyword}"
