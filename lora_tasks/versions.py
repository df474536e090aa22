"""Version identity: the one spelling of a registered version number, which the registry, the
alias moves, the audit trail, serving and the CLI all compare, and the aliases that name one."""

from __future__ import annotations

import re

from .errors import RegistryError

# A version the gate admits becomes the challenger and a bare model reference means the champion.
# Moving an alias (lock, compare-and-set, audit) is `registry/aliases.py`'s job.
CHAMPION, CHALLENGER = "champion", "challenger"


def is_version(ref: object) -> bool:
    """Whether `ref` names a version (ASCII digits: `3`, `0003`), not an alias."""
    return isinstance(ref, int) or (isinstance(ref, str) and re.fullmatch(r"[0-9]+", ref) is not None)


MAX_DIGITS = 18
"""Most digits of a version number (leading zeros aside): MLflow counts versions in 64 bits."""


def canonical_version(version: object) -> str:
    """The one spelling of a version number (`"0002"` and `2` are `"2"`). Anything but ASCII
    digits (`"٢"`, `"2.0"`, `"-1"`), 0, or more than MAX_DIGITS digits (checked before any
    conversion: `int()` refuses 4,300) is an error that says what to type."""
    if isinstance(version, int) and not isinstance(version, bool):
        if abs(version) >= 10**MAX_DIGITS:
            raise RegistryError(f"a number that large is not a version number (at most {MAX_DIGITS} digits); give one, like 3")
        version = str(version)
    digits = version.lstrip("0") if isinstance(version, str) and is_version(version) else ""
    if len(digits) > MAX_DIGITS:
        raise RegistryError(f"a number of {len(digits):,} digits is not a version number: versions count up from 1 "
                            f"(at most {MAX_DIGITS} digits); give one, like 3")
    if not digits:
        shown = repr(version) if len(repr(version)) <= 60 else f"{repr(version)[:40]}..."
        raise RegistryError(f"{shown} is not a version number: use ASCII digits, like 3")
    return digits
