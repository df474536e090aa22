"""Registered adapters made in seconds, for tests, benches and demos of serving.

Each adapter is a PEFT LoRA with random (non-zero) weights on the given base, so every version
answers differently from the base and from the others; it is logged and registered exactly as
the retraining flow does (pyfunc model from code, lineage tags, `challenger` alias)."""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.registry import aliases, registry, tracking


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server a test or bench starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(name: str, base_dir: str, tracking_uri: str, artifacts: str, task: str = "causal_lm",
                required_fields: list[str] | None = None):
    """A config of `task` on the tiny base; with `required_fields`, its answers are JSON objects
    holding them (`evaluation.generation`: metric json), as the live output checks read them."""
    data = ({"train_path": "unused.jsonl", "prompt_column": "prompt", "completion_column": "completion"}
            if task == "causal_lm" else {"train_path": "unused.jsonl", "text_column": "text", "labels": ["neg", "pos"]})
    raw = {
        "model_name": name, "task": task, "base_model": {"name_or_path": str(base_dir)}, "data": data,
        "training": {"max_steps": 1, "max_seq_length": 64, "seed": 0},
        "tracking": {"tracking_uri": tracking_uri, "artifact_location": artifacts},
        **({"evaluation": {"generation": {"metric": "json", "required_fields": required_fields}}}
           if required_fields is not None else {}),
    }
    return config_from_dict(raw, "tiny serving config")


def make_random_adapter(base_dir: str, out_dir: str | Path, seed: int, scale: float = 0.5, task: str = "causal_lm") -> Path:
    """A LoRA adapter with random A and B (scaled), saved as safetensors; for classification
    the (saved) classifier head is random too."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from prefect_lora.lora_tasks.modeling import load_base_model

    torch.manual_seed(seed)
    causal = task == "causal_lm"
    base = load_base_model(base_dir, task, num_labels=None if causal else 2, pad_token_id=0)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS, r=4,
                                            lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or (not causal and "score" in n):
                p.normal_(0.0, scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def register_random_adapters(tracking_uri: str, name: str, base_dir: str, seeds: list[int],
                             workdir: str | Path | None = None, task: str = "causal_lm",
                             required_fields: list[str] | None = None) -> list[str]:
    """Register one version per seed; returns the version numbers. `required_fields`: see `tiny_config`."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="pl-adapters-"))
    adapters = {f"random-adapter-{seed}": make_random_adapter(base_dir, workdir / f"adapter-{name}-{seed}", seed, task=task)
                for seed in seeds}
    return register_adapters(tracking_uri, name, base_dir, adapters, workdir, task, required_fields)


def register_adapters(tracking_uri: str, name: str, base_dir: str, adapters: dict[str, Path], workdir: Path,
                      task: str = "causal_lm", required_fields: list[str] | None = None) -> list[str]:
    """Register each adapter folder of `adapters` (run name: folder) as a version of `name`, in
    order, each the challenger once registered; returns the version numbers."""
    cfg = tiny_config(name, base_dir, tracking_uri, str(workdir / "mlartifacts"), task, required_fields)
    versions = []
    for run_name, adapter in adapters.items():
        c = tracking.client(tracking_uri)
        exp = tracking.ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
        run_id = c.create_run(exp, run_name=run_name).info.run_id
        tracking.log_metrics(tracking_uri, run_id, {"base_eval_loss": 5.0, "adapted_eval_loss": 4.0})
        uri = registry.log_adapter_model(cfg, run_id, str(adapter), str(base_dir))
        versions.append(registry.register_version(tracking_uri, name, uri, run_id, {"lineage.base_model": str(base_dir)}))
        aliases.set_challenger(tracking_uri, name, versions[-1], f"{run_name}, for serving tests", run_id)
        tracking.end_run(tracking_uri, run_id)
    return versions


@dataclass(frozen=True)
class Sent:
    """One request of a `Load`: when it was sent and answered (monotonic seconds), its status, and
    the version and text that answered it (None when it failed)."""

    sent: float
    done: float
    status: int
    version: str | None
    text: str | None


class Load:
    """`clients` threads sending greedy completions to the champion (`model` NAME) until `stop()`,
    each as soon as its previous one is answered; every request is kept (`Sent`). A request that
    gets no HTTP answer (connection refused, timeout) counts as status 0."""

    def __init__(self, url: str, model: str, prompts: list[str], clients: int = 8, max_tokens: int = 16,
                 headers: dict | None = None):
        self.url, self.model, self.prompts, self.clients, self.max_tokens = url, model, prompts, clients, max_tokens
        self.headers, self.sent, self._threads, self._stop = headers or {}, [], [], threading.Event()

    def start(self) -> Load:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Sent]:
        self._stop.set()
        for t in self._threads:
            t.join(300)
        return self.sent

    def _client(self, i: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=300, headers=self.headers) as c:
            k = i
            while not self._stop.is_set():
                body = {"model": self.model, "prompt": self.prompts[k % len(self.prompts)],
                        "max_tokens": self.max_tokens, "temperature": 0}
                k += self.clients
                sent = time.monotonic()
                try:
                    r = c.post("/v1/completions", json=body)
                    status, answer = r.status_code, (r.json() if r.status_code == 200 else {})
                except httpx.HTTPError:
                    status, answer = 0, {}
                version = answer["model"].rsplit("/", 1)[1] if answer else None
                self.sent.append(Sent(sent, time.monotonic(), status, version,
                                      answer["choices"][0]["text"] if answer else None))

    def failed(self) -> list[Sent]:
        return [s for s in self.sent if s.status != 200]


HUGE_DIGITS = "9" * 5000
"""More digits than Python reads as an integer (4,300): in a version, a `max_tokens`, a Content-Length."""
_HUGE_MARK = "@@huge-integer@@"
ROUTES = {"/v1/completions": "complete", "/v1/chat/completions": "chat", "/v1/classify": "classify"}
"""The inference routes and the operation (`deploy.serve.ROUTE_NAME`) each runs."""


def request_bodies(names: tuple[str, ...] = ("m",)):
    """A hypothesis strategy of (route, request body bytes) that tries a server's request rules:
    bodies of random shape (wrong types, missing fields, nested junk, bytes that are no JSON),
    odd Unicode (lone surrogates, NUL, bidi controls, 10,000-character strings), integers of
    5,000 digits as numbers and in model references and versions, and valid requests among them
    (for the served models `names`)."""
    import json

    from hypothesis import strategies as st

    odd = st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff", "\x00", "nul\x00here", "\u202eevil\u202c", "\u200f",
                           "\ufeff", "x" * 10_000, "\u0663", "\u00b2", "\U0001d7d8", "\U0001f642", HUGE_DIGITS, ""])
    text = st.one_of(st.text(st.characters(exclude_categories=()), max_size=20), odd, st.sampled_from(["hi", "2 plus 2?"]))
    number = st.one_of(st.integers(), st.integers(-2, 20), st.floats(), st.just(_HUGE_MARK))
    junk = st.recursive(st.one_of(st.none(), st.booleans(), number, text),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8)
    ref = st.one_of(text, st.sampled_from(["champion", "challenger", "staging", "1", "01", "v1", "0", "2", "99", "-1", "1.0",
                                           "2147483648", "0" * 5000 + "1", HUGE_DIGITS, "v" + HUGE_DIGITS, "a" * 300]))
    model = st.one_of(junk, st.builds(lambda name, sep, r: f"{name}{sep}{r}", st.sampled_from([*names, "other", ""]) | text,
                                      st.sampled_from(["@", "/", ""]), ref))
    prompt = st.one_of(junk, text, st.lists(text, min_size=1, max_size=3))
    role = st.sampled_from(["user", "system", "assistant", "robot"]) | junk
    messages = st.one_of(junk, st.lists(st.fixed_dictionaries({"role": role, "content": text | junk}), min_size=1, max_size=3))
    fields = st.fixed_dictionaries({}, optional={
        "model": model, "prompt": prompt, "messages": messages, "input": prompt,
        "max_tokens": st.integers(1, 8) | number | junk, "temperature": st.sampled_from([0, 0.5, 2]) | number | junk})
    plain = st.text(st.characters(codec="utf-8"), max_size=30)  # any valid Unicode: NUL, bidi controls, emoji...
    valid = st.fixed_dictionaries(
        {"prompt": plain | st.lists(plain, min_size=1, max_size=2), "input": plain,
         "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": plain}),
                              min_size=1, max_size=2).map(lambda m: [*m, {"role": "user", "content": "hi"}])},
        optional={"model": st.sampled_from([*names, f"{names[0]}@champion", f"{names[0]}/1", "01", "challenger"]),
                  "max_tokens": st.integers(1, 8), "temperature": st.sampled_from([0, 0.5, 2])})
    dumped = st.one_of(valid, fields, junk).map(lambda body: json.dumps(body).replace(f'"{_HUGE_MARK}"', HUGE_DIGITS).encode())
    return st.tuples(st.sampled_from(sorted(ROUTES)), dumped | st.binary(max_size=40))
