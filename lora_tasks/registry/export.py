"""Export a registered adapter: a plain PEFT folder (vLLM's LoRA support loads it as it is), or a
merged model (base + adapter folded into the weights) for targets without adapter support.

Both read the version from MLflow, load weights from safetensors only, and write safetensors."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraTaskError
from . import registry

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: str
    kind: str
    """`adapter` or `merged`."""
    path: Path
    files: list[str]


def copy_safe_adapter(src: str | Path, dst: str | Path) -> Path:
    """Copy only the adapter's config and safetensors weights: whatever else sits beside them
    (pickled `.bin` weights, code) is never loaded."""
    src, dst = Path(src), Path(dst)
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise LoraTaskError(f"adapter folder {src} lacks {missing}; only safetensors PEFT adapters are loaded")
    dst.mkdir(parents=True, exist_ok=True)
    for f in ADAPTER_FILES:
        shutil.copy2(src / f, dst / f)
    return dst


def resolve_ref(tracking_uri: str, ref: str) -> tuple[str, str]:
    """`NAME@ALIAS`, `NAME/VERSION` or `NAME` (champion) -> (name, version), with clear errors."""
    name, which = registry.parse_model_ref(ref)
    if not name:
        raise LoraTaskError(f"cannot read the model reference {ref!r}: write NAME@ALIAS (e.g. demo@champion) or NAME/VERSION")
    return name, registry.resolve_version(tracking_uri, name, which)


def load_adapted(files: registry.VersionFiles, *, trust_remote_code: bool = False, adapter_name: str = "default"):
    """Base model (from the version's recorded base and revision) with the version's adapter, and its tokenizer."""
    import tempfile

    from peft import PeftModel

    from ..modeling import load_base_model, load_tokenizer

    cfg = files.model_config
    if not cfg.get("base_model") or not cfg.get("task"):
        raise LoraTaskError(f"version {files.version} of {files.name!r} records no base model or task in its MLmodel")
    tokenizer = load_tokenizer(cfg["base_model"], cfg.get("revision"), trust_remote_code=trust_remote_code)
    labels = cfg.get("labels")
    base = load_base_model(
        cfg["base_model"], cfg["task"], revision=cfg.get("revision"), num_labels=len(labels) if labels else None,
        torch_dtype=cfg.get("torch_dtype") or "float32", trust_remote_code=trust_remote_code,
        pad_token_id=tokenizer.pad_token_id,
    )
    clean = copy_safe_adapter(files.adapter_dir, tempfile.mkdtemp(prefix="pl-adapter-"))
    model = PeftModel.from_pretrained(base, str(clean), adapter_name=adapter_name, is_trainable=False)
    model.eval()
    return model, tokenizer


def _prepare_out(out_dir: str | Path, force: bool) -> tuple[Path, Path]:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise LoraTaskError(f"{out} exists and is not empty; choose another folder or pass --force to replace it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def _finish(out: Path, tmp: Path) -> None:
    # Written beside the target and renamed: a reader never sees half an export.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _lineage(tracking_uri: str, name: str, version: str, files: registry.VersionFiles, kind: str) -> dict:
    info = registry.get_version(tracking_uri, name, version)
    return {
        "registered_model": name, "version": version, "kind": kind, "run_id": info.run_id,
        "base_model": files.model_config.get("base_model"), "revision": files.model_config.get("revision"),
        "task": files.model_config.get("task"),
        "lineage": {k: v for k, v in info.tags.items() if k.startswith("lineage.")},
    }


def export_adapter(tracking_uri: str, ref: str, out_dir: str | Path, *, force: bool = False) -> ExportResult:
    """Write the version's PEFT adapter (adapter_config.json + adapter_model.safetensors) to `out_dir`."""
    name, version = resolve_ref(tracking_uri, ref)
    files = registry.download_version(tracking_uri, name, version)
    out, tmp = _prepare_out(out_dir, force)
    copy_safe_adapter(files.adapter_dir, tmp)
    (tmp / "prefect_lora.json").write_text(json.dumps(_lineage(tracking_uri, name, version, files, "adapter"), indent=2))
    _finish(out, tmp)
    return ExportResult(name, version, "adapter", out, sorted(p.name for p in out.iterdir()))


def export_merged(tracking_uri: str, ref: str, out_dir: str | Path, *, force: bool = False,
                  trust_remote_code: bool = False) -> ExportResult:
    """Fold the version's adapter into its base (`merge_and_unload`) and save model + tokenizer as safetensors."""
    name, version = resolve_ref(tracking_uri, ref)
    files = registry.download_version(tracking_uri, name, version)
    model, tokenizer = load_adapted(files, trust_remote_code=trust_remote_code)
    merged = model.merge_and_unload()
    labels = files.model_config.get("labels")
    if labels:
        merged.config.id2label = {i: str(x) for i, x in enumerate(labels)}
        merged.config.label2id = {str(x): i for i, x in enumerate(labels)}
    out, tmp = _prepare_out(out_dir, force)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "prefect_lora.json").write_text(json.dumps(_lineage(tracking_uri, name, version, files, "merged"), indent=2))
    _finish(out, tmp)
    return ExportResult(name, version, "merged", out, sorted(p.name for p in out.iterdir()))
