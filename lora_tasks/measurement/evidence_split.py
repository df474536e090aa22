"""The evidence split in two by content hash: a remedy compares its trials on the *search* part
only, and the gate reads the chosen trial's figures on the *confirm* part, which took no part in
the choice (choosing the best of several noisy figures inflates them: the winner's curse)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def confirm_mask(keys: list[str], fraction: float, salt: str = "confirm") -> list[bool]:
    """True for the keys (eval rows, probe prompts) in the confirmation part: those whose salted
    content hash falls below `fraction`. A key's part depends on its content alone, so it is the
    same in every run and on every machine, and a duplicate never sits on both sides."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the confirmation share must be between 0 and 1, got {fraction}")
    return [int.from_bytes(hashlib.sha256(f"{salt}:{k}".encode()).digest()[:8], "big") / 2**64 < fraction for k in keys]



def split_for_confirmation(items: list, keys: list[str], fraction: float) -> tuple[list, list]:
    """(search part, confirm part) of `items`, by `confirm_mask` of their `keys`. Raises when
    either part would be empty: a remedy needs evidence on both sides."""
    mask = confirm_mask(keys, fraction)
    search = [x for x, m in zip(items, mask) if not m]
    confirm = [x for x, m in zip(items, mask) if m]
    if not search or not confirm:
        raise ValueError(f"{len(items)} items cannot be split into a search and a confirmation part at share "
                         f"{fraction}: give more eval rows (or probes)")
    return search, confirm



@dataclass(frozen=True)
class Part:
    """One side of the split evidence: `search` or `confirm`, at the confirmation share."""

    name: str
    fraction: float

    def keep(self, items: list, keys: list[str]) -> list:
        """The items (rows, probes, text blocks, questions) on this side, by their keys' content."""
        side = self.name == "confirm"
        return [x for x, m in zip(items, confirm_mask(keys, self.fraction)) if m == side]
