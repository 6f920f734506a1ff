"""The sandbox container's resources on this cluster: the task's own, filled in from the
operator's defaults, and held to the operator's maxima. SpecError names the field."""

from __future__ import annotations

from sandbox_agent.quantity import parse_quantity
from sandbox_agent.task import Resources, SandboxTask

from .errors import SpecError
from .settings import OperatorSettings

FIELD = "spec.sandbox.resources"


def sandbox_resources(task: SandboxTask, settings: OperatorSettings) -> Resources:
    """Requests and limits for the sandbox container.

    A limit the task leaves out is the operator's default limit, else its maximum (no limit at
    all would be above any maximum). A request the task leaves out is the operator's default
    request, lowered to the limit when that is smaller. A limit above the maximum, or a request
    of the task's above its limit, is refused."""
    given = task.spec.sandbox.resources
    defaults = settings.sandbox_default_resources
    limits = {**settings.sandbox_max_limits, **defaults.limits, **given.limits}
    for name, most in settings.sandbox_max_limits.items():
        if parse_quantity(limits[name]) > parse_quantity(most):
            raise SpecError(
                f"{FIELD}.limits.{name}",
                f"{limits[name]} is above the operator's maximum {most} "
                "(LLMSANDBOX_SANDBOX_MAX_LIMITS)",
            )
    requests = dict(given.requests)
    for name, value in defaults.requests.items():
        if name not in requests:
            limit = limits.get(name)
            fits = limit is None or parse_quantity(value) <= parse_quantity(limit)
            requests[name] = value if fits else str(limit)
    for name, value in given.requests.items():
        limit = limits.get(name)
        if limit is not None and parse_quantity(value) > parse_quantity(limit):
            whose = "" if name in given.limits else " (the operator's default or maximum)"
            raise SpecError(
                f"{FIELD}.requests.{name}", f"{value} is above its limit {limit}{whose}"
            )
    return Resources(requests=requests, limits=limits)


def runtime_class(task: SandboxTask, settings: OperatorSettings) -> str | None:
    """The pod's RuntimeClass: the operator's required one, which a task may not change."""
    required = settings.required_runtime_class
    asked = task.spec.sandbox.runtime_class_name
    if required is None:
        return asked
    if asked is not None and asked != required:
        raise SpecError(
            "spec.sandbox.runtimeClassName",
            f"{asked!r} is not allowed: the operator runs every sandbox under RuntimeClass "
            f"{required!r} (LLMSANDBOX_REQUIRED_RUNTIME_CLASS)",
        )
    return required
