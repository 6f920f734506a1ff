"""Kubernetes resource quantities (500m, 2, 512Mi, 1e3) as numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .wire import QUANTITY_PATTERN

_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
# Group 1 is the number, group 3 the suffix (see wire.QUANTITY_PATTERN).
_QUANTITY = re.compile(QUANTITY_PATTERN)


def parse_quantity(text: str) -> Decimal:
    """The value of a quantity in base units (cores, bytes); ValueError names the text."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi)")
    suffix = match[3] or ""
    try:
        number = Decimal(match[1])
        if suffix[:1] in ("e", "E"):
            return number * Decimal(10) ** int(suffix[1:])
        return number * _SUFFIXES[suffix]
    except (InvalidOperation, KeyError):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi)") from None
