"""Version identity: the one spelling of a registered version number, which the registry, the
alias moves, the audit trail, serving and the CLI all compare."""

from __future__ import annotations

import re

from .errors import RegistryError


def is_version(ref: object) -> bool:
    """Whether `ref` names a version (ASCII digits: `3`, `0003`), not an alias."""
    return isinstance(ref, int) or (isinstance(ref, str) and re.fullmatch(r"[0-9]+", ref) is not None)


def canonical_version(version: object) -> str:
    """The one spelling of a version number (`"0002"` and `2` are `"2"`). Anything but ASCII
    digits (`"٢"`, `"2.0"`, `"-1"`) or 0 is an error that says what to type."""
    if not is_version(version) or int(version) < 1:
        raise RegistryError(f"{version!r} is not a version number: use ASCII digits, like 3")
    return str(int(version))
