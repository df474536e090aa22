"""Named views of the models an evaluation compares: `base`, `adapted` and, when there is one, `champion`.

With LoRA there is one copy of the base weights: every view is the same PeftModel, with an
adapter active (`set_adapter`) or all of them off (`disable_adapter()`). A fully fine-tuned
model shares nothing with its base, so its views are two separately loaded models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

BASE, ADAPTED, CHAMPION = "base", "adapted", "champion"


class PeftViews:
    """Views of one PeftModel holding one or more adapters; `adapters` maps view -> adapter name,
    `separate` adds views that are other models (a fully fine-tuned model beside the base)."""

    def __init__(self, peft_model, adapters: dict[str, str] | None = None, separate: dict[str, object] | None = None):
        self.model = peft_model
        self.adapters = dict(adapters or {ADAPTED: "default"})
        self.separate = dict(separate or {})

    @property
    def names(self) -> list[str]:
        return [BASE, *self.adapters, *self.separate]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator:
        if name in self.separate:
            self.separate[name].eval()
            yield self.separate[name]
            return
        self.model.eval()
        if name == BASE:
            with self.model.disable_adapter():
                yield self.model
            return
        self.model.set_adapter(self.adapters[name])
        yield self.model

    @contextlib.contextmanager
    def scaled(self, name: str, scale: float) -> Iterator[None]:
        """Inside the block, view `name`'s adapter applies `scale` times its trained update
        (LoRA's scaling factor, in place: no copy of any weight)."""
        if scale == 1.0:
            yield
            return
        if name not in self.adapters:
            raise ValueError(f"view {name!r} is no LoRA adapter: only adapters can be scaled")
        from peft.tuners.lora import LoraLayer

        adapter = self.adapters[name]
        saved = [(m, m.scaling[adapter]) for m in self.model.modules() if isinstance(m, LoraLayer) and adapter in m.scaling]
        for m, s in saved:
            m.scaling[adapter] = s * scale
        try:
            yield
        finally:
            for m, s in saved:
                m.scaling[adapter] = s


class SeparateViews:
    """Views that are separate models (full fine-tuning: the tuned copy and its base)."""

    def __init__(self, models: dict[str, object]):
        self.models = dict(models)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator:
        model = self.models[name]
        model.eval()
        yield model

    @contextlib.contextmanager
    def scaled(self, name: str, scale: float) -> Iterator[None]:
        if scale != 1.0:
            raise ValueError("a fully fine-tuned model has no adapter to scale (remedy.strategy: scale needs LoRA)")
        yield
