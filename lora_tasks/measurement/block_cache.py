"""What the forgetting comparison (`forgetting.compare_on_blocks`) can reuse instead of running a model.

The base's side of the comparison is the same for every adapter: its final hidden states at the
scored positions of a block set are kept in memory (the scales of a remedy) and on disk (the next
scheduled run), so that only the base's output layer runs again. A model that does not change
between runs (the base, a champion: today's adapter as trained is tomorrow's champion) keeps its
per-block units (`tokens`, `nll` and, against the base, `kl`) on disk, keyed by its identity
(`score_cache.model_identity`: weights, precision, device, code version) and the blocks: the
next run reads them and does not run that model at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..modeling import cache_dir, write_cache_file
from ..training.views import BASE

MAX_STATES_BYTES = 512 << 20
"""Base states larger than this (a long corpus on a wide model) are kept in memory only."""


@dataclass
class BlockCache:
    identities: dict[str, str | None] = field(default_factory=dict)
    """The identity of the model each view is now; a view without one (a scaled adapter, a base
    without a content hash) is never read from or written to disk."""
    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """The base's states by block set, in memory."""

    def units(self, view: str, blocks: str) -> dict[str, np.ndarray] | None:
        """The per-block units `view` left on these blocks in an earlier run, or None."""
        path = self._path(view, blocks, ".npz")
        if path is None:
            return None
        try:
            with np.load(path) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError, TypeError):  # never stored, removed meanwhile, or unreadable: compute again
            return None

    def keep_units(self, view: str, blocks: str, units: dict[str, np.ndarray]) -> None:
        path = self._path(view, blocks, ".npz")
        if path is not None:
            _atomic(path, lambda f: np.savez(f, **units))

    def base_states(self, blocks: str) -> list[torch.Tensor] | None:
        if blocks in self.states:
            return self.states[blocks]
        path = self._path(BASE, blocks, ".pt")
        if path is None:
            return None
        try:
            self.states[blocks] = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, TypeError, EOFError):
            return None
        return self.states[blocks]

    def keep_states(self, blocks: str, states: list[torch.Tensor]) -> None:
        self.states[blocks] = states
        path = self._path(BASE, blocks, ".pt")
        if path is not None and sum(s.numel() * s.element_size() for s in states) <= MAX_STATES_BYTES:
            _atomic(path, lambda f: torch.save(states, f))

    def _path(self, view: str, blocks: str, suffix: str) -> Path | None:
        identity = self.identities.get(view)
        if identity is None:
            return None
        key = hashlib.sha256(f"{identity}\n{blocks}\n{suffix}".encode()).hexdigest()[:32]
        return cache_dir() / "forgetting" / f"{key}{suffix}"


def _atomic(path: Path, write) -> None:
    """`write_cache_file`, where a full or read-only disk costs the next run its reuse, never this
    run its result."""
    try:
        write_cache_file(path, write)
    except OSError:
        pass
