"""A package's public face without its import cost: the names in its `__all__`, each imported
from its module on first use (PEP 562), so `from prefect_lora.lora_tasks.gate import
decide_promotion` loads the gate's pure functions and not the model code beside them."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, faces: dict[str, list[str]]):
    """(`__all__`, `__getattr__`, `__dir__`) for `package`, whose modules (`faces` keys, relative
    to it) hold the public names listed for each."""
    where = {name: module for module, names in faces.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
