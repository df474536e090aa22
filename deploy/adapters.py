"""The adapters attached to one base model in memory, for a serving replica.

Adapters attach by key (`NAME/VERSION`), the most recently used stay attached within a count and
a memory bound, the active one switches by name alone, and a batch whose rows use different
adapters runs in one pass. No Serve, no HTTP: `deploy/serve.py`'s `AdapterModel` holds one.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

logger = logging.getLogger("ray.serve")


class AdapterSet:
    """LoRA adapters of one base model, attached on demand, least recently used detached first."""

    def __init__(self, base, task: str, files_for: Callable, max_count: int, max_bytes: float | None):
        self.base, self.task, self.files_for = base, task, files_for
        self.max_count, self.max_bytes = max_count, max_bytes or float("inf")
        self.peft = None
        self.loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> bytes, least recently used first
        self.loads = self.evictions = self.mixed_batches = 0
        self.load_seconds = 0.0
        self._layers, self._active = None, None  # the LoRA layers `switch` moves; the adapter they run
        self._stacks = None  # (adapter names, each layer's weights of them stacked): `by_row` reads them

    @staticmethod
    def name_of(key: str) -> str:
        """A PEFT adapter name for a (model, version) key: module names take no dots or slashes."""
        return "a" + hashlib.sha1(key.encode()).hexdigest()[:16]

    def ensure(self, key: str, keep: frozenset[str] = frozenset()) -> str:
        """Attach the key's adapter if it is not attached, and mark it most recently used;
        detaching others to stay within bounds never detaches one in `keep`."""
        from peft import PeftModel
        from prefect_lora.lora_tasks.registry.export import copy_safe_adapter

        name = self.name_of(key)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name
        started = time.perf_counter()
        files = self.files_for(key)
        with tempfile.TemporaryDirectory(prefix="pl-serve-") as tmp:  # gone once the weights are in memory
            clean = copy_safe_adapter(files.adapter_dir, tmp)
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(clean), adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(str(clean), adapter_name=name, is_trainable=False)
        self.peft.eval()
        self._layers, self._active = None, None  # found again after an attach (PEFT may activate the new one)
        self._stacks = None
        self.loaded[name] = sum(p.numel() * p.element_size() for n, p in self.peft.named_parameters() if f".{name}." in n)
        self.loads += 1
        self.load_seconds += time.perf_counter() - started
        self._evict(keep | {name})
        logger.info("adapter of %s attached (%d attached, %.1f MiB)", key, len(self.loaded), self.bytes() / 2**20)
        return name

    def bytes(self) -> int:
        return sum(self.loaded.values())

    def _evict(self, keep: frozenset[str]) -> None:
        """Detach least recently used adapters until both bounds hold; those in `keep` (the
        running batch's) stay, so a batch of more adapters than the bound exceeds it while it runs."""
        while len(self.loaded) > self.max_count or self.bytes() > self.max_bytes:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                return
            self._detach(victim)

    def _detach(self, name: str) -> None:
        if self._active == name:
            self.switch(next(n for n in self.loaded if n != name))
        self.peft.delete_adapter(name)
        self._layers = self._stacks = None
        self._active = None  # PEFT may have moved it while deleting: `switch` sets it again
        del self.loaded[name]
        self.evictions += 1

    def detach(self, key: str) -> None:
        """Detach the key's adapter (Serve's own cache let it go), unless it is the last one: the
        PEFT wrapper needs one."""
        name = self.name_of(key)
        if name in self.loaded and len(self.loaded) > 1:
            self._detach(name)
            logger.info("adapter of %s detached (least recently used)", key)

    def activate(self, keys: list[str]) -> tuple:
        """The PEFT model with the adapter of every key attached (again, if a bound detached one
        since routing); one adapter is made the active one, several go by row: each key's
        adapter name is returned for PEFT's `adapter_names`."""
        keep = frozenset(self.name_of(k) for k in keys)
        names = [self.ensure(k, keep) for k in keys]
        if len(keep) > 1:
            self.mixed_batches += 1
            return self.peft, names  # `by_row` runs them (a causal LM), or PEFT's `adapter_names` (a classifier)
        self.switch(names[0])
        return self.peft, None

    @contextmanager
    def by_row(self, names: list[str] | None):
        """Within: row i of a causal LM's batch runs through adapter `names[i]`, all rows in one
        pass. A hook on each LoRA layer adds every row's B_i A_i x_i * scale_i with two batched
        matmuls over the rows' stacked weights (ranks padded to the largest), while the layers'
        own adapters are off. PEFT's own per-row routing (`adapter_names`) loops in Python over
        adapters in every layer at every step: a batch of 4 tiny-model rows took 260 ms that way
        against 22 ms for one adapter. Layers other than plain LoRA Linear (DoRA, embeddings)
        and classifiers (a head per adapter) go PEFT's way. Yields `generate`'s extra arguments."""
        if not names:
            yield {}
            return
        if not self.routes_rows(names):
            yield {"adapter_names": names}
            return
        import torch

        distinct = tuple(sorted(set(names)))
        rows = torch.tensor([distinct.index(n) for n in names])
        hooks = []
        for a, b, scale, _ in self._stacked_weights(distinct):
            a, b, scale = a[rows], b[rows], scale[rows]
            hooks.append(lambda mod, args, out, a=a, b=b, scale=scale: out + torch.bmm(
                torch.bmm(args[0].to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)).mul_(scale).to(out.dtype))
        with self._hooked(hooks):
            yield {}

    @contextmanager
    def by_token(self, names: list[str]):
        """Within: token i of a packed pass (one sequence holding the tokens of many rows, as a
        continuous batch runs) runs through adapter `names[i]`. A hook on each LoRA layer adds
        ((x A^T) * M) (B s)^T with the weights of the pass's k adapters side by side (A: [k r, in],
        B s: [out, k r]) and M keeping each token's own adapter's r columns: three operations per
        layer whatever the adapters, at k times one adapter's (small) LoRA cost. Plain LoRA Linear
        layers only (`routes_rows`); yields the forward's extra arguments (none)."""
        import torch

        distinct = tuple(sorted(set(names)))
        block = torch.tensor([distinct.index(n) for n in names])
        masks: dict[tuple, torch.Tensor] = {}  # by (rank, dtype): [1, tokens, k r], 1 on each token's adapter's columns
        hooks = []
        for a, _, _, b in self._stacked_weights(distinct):
            r = a.shape[1]
            if (r, a.dtype) not in masks:
                columns = torch.arange(len(distinct)).repeat_interleave(r)
                masks[r, a.dtype] = (block[:, None] == columns).to(a.dtype)[None]
            a, m = a.reshape(-1, a.shape[-1]), masks[r, a.dtype]
            hooks.append(lambda mod, args, out, a=a, b=b, m=m: out + (args[0].to(a.dtype) @ a.T * m @ b.T).to(
                out.dtype))
        with self._hooked(hooks):
            yield {}

    @contextmanager
    def _hooked(self, hooks: list):
        """Within: each LoRA layer runs its base only (PEFT's disable_adapter took 190 ms here) and
        then its hook of `hooks` (one per layer, in `_tuner_layers` order), which adds the adapters."""
        layers, handles = self._tuner_layers(), []
        try:
            for layer, hook in zip(layers, hooks):
                handles.append(layer.register_forward_hook(hook))
                layer._disable_adapters = True
            yield
        finally:
            for h in handles:
                h.remove()
            for layer in layers:
                layer._disable_adapters = False

    def _stacked_weights(self, names: tuple[str, ...]) -> list[tuple]:
        """Each LoRA layer's weights of the adapters `names`, stacked (`_stacked`) and B s side by
        side ([out, k r], for `by_token`); kept while the attached adapters stay (a continuous batch
        routes its tokens anew at every join and leave)."""
        if self._stacks is None or self._stacks[0] != names:
            stacks = [_stacked(layer, list(names)) for layer in self._tuner_layers()]
            self._stacks = (names, [(a, b, s, (b * s).permute(1, 0, 2).reshape(b.shape[1], -1)) for a, b, s in stacks])
        return self._stacks[1]

    def _tuner_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if self._layers is None:
            self._layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    def routes_rows(self, names: list[str]) -> bool:
        """Whether `by_row` can run these adapters: a causal LM whose adapter layers are all plain
        LoRA Linear layers without variants (DoRA and the like)."""
        from peft.tuners.lora import Linear

        return self.task == "causal_lm" and all(
            isinstance(m, Linear) and not any(n in m.lora_variant for n in names) for m in self._tuner_layers())

    def switch(self, name: str) -> None:
        """Make `name` the active adapter. PEFT's `set_adapter` also sets requires_grad on every
        attached adapter's weights (24 ms per switch with 100 attached to the tiny model); here
        they are all frozen already, so a causal LM only moves each LoRA layer's active name. A
        classifier's head is a per-adapter module that PEFT switches too: there, PEFT does it."""
        if self._active == name:
            return
        if self.task != "causal_lm":
            self.peft.set_adapter(name)
        else:
            for layer in self._tuner_layers():
                layer._active_adapter = [name]
        self._active = name

    def stats(self) -> dict:
        """Attached adapters, their weights' memory, loads (with their mean time: fetch, check,
        attach), evictions and batches that mixed adapters."""
        return {"adapters": len(self.loaded), "adapter_bytes": self.bytes(), "loads": self.loads,
                "mean_load_ms": round(1000 * self.load_seconds / max(self.loads, 1), 1), "evictions": self.evictions,
                "mixed_batches": self.mixed_batches}


def _stacked(layer, names: list[str]):
    """The rows' LoRA weights of one layer: A as [rows, r, in], B as [rows, out, r] (ranks padded
    with zeros to the largest) and each row's scale as [rows, 1, 1]."""
    import torch

    r = max(layer.lora_A[n].weight.shape[0] for n in set(names))
    pad_a = {n: torch.nn.functional.pad(layer.lora_A[n].weight, (0, 0, 0, r - layer.lora_A[n].weight.shape[0]))
             for n in set(names)}
    pad_b = {n: torch.nn.functional.pad(layer.lora_B[n].weight, (0, r - layer.lora_B[n].weight.shape[1])) for n in set(names)}
    a = torch.stack([pad_a[n] for n in names])
    b = torch.stack([pad_b[n] for n in names])
    return a, b, torch.tensor([layer.scaling[n] for n in names], dtype=a.dtype).view(-1, 1, 1)
