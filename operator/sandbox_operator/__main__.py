"""`python -m sandbox_operator`: run the operator (in a cluster, or against your kubeconfig)."""

from __future__ import annotations

import sys

import kopf

from . import handlers  # noqa: F401 - registers the kopf handlers
from .settings import SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"invalid operator settings:\n{exc}", file=sys.stderr)
        return 2
    kopf.run(
        standalone=True,
        clusterwide=not settings.watched_namespaces,
        namespaces=settings.watched_namespaces,
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
