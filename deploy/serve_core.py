"""The serving rules that need no Ray: config, request limits, model references, auth, canary.

`deploy/serve.py` wires them into a Ray Serve application; keeping them here lets unit tests
check every rule without starting anything."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import random
import reprlib
import threading
from collections import Counter, deque
from pathlib import Path
from typing import Any, Literal

from prefect_lora.deploy.rollout import RolloutConfig
from prefect_lora.lora_tasks.config_io import StrictNumbers, plain, read_yaml
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.versions import canonical_version, is_version
from pydantic import ConfigDict, Field, ValidationError

TOKEN_ENV = "PREFECT_LORA_SERVE_TOKEN"
ALIASES = ("champion", "challenger")


class ServeConfig(StrictNumbers):
    """How one registered model is served. Every field has a safe default."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_name: str
    """Registered model whose versions are served."""
    tracking_uri: str = "sqlite:///.prefect-lora/mlflow.db"
    """MLflow tracking URI holding the registered model."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (0.0.0.0 to expose it)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    app_name: str = "prefect-lora"
    """Ray Serve application name (one app per served model)."""
    mode: Literal["adapter", "merged"] = "adapter"
    """`adapter`: one base in memory, adapters multiplexed on it; `merged`: one merged model per version."""
    poll_interval_s: float = Field(10.0, gt=0)
    """How often the aliases are re-read from MLflow (a notify swaps at once)."""
    canary_share: float = Field(0.0, ge=0.0, le=1.0)
    """Share of champion-bound requests sent to the `challenger` version instead, when it differs."""
    max_body_bytes: int = Field(65_536, ge=256)
    """Largest request body accepted (413 above)."""
    max_prompt_chars: int = Field(8_000, ge=1)
    """Longest prompt or message text accepted, in characters (400 above)."""
    max_prompt_tokens: int = Field(1_024, ge=1)
    """Longest tokenized prompt accepted (400 above)."""
    max_tokens_cap: int = Field(256, ge=1)
    """Largest `max_tokens` a request may ask for (400 above)."""
    default_max_tokens: int = Field(64, ge=1)
    """`max_tokens` when a request gives none."""
    max_batch: int = Field(16, ge=1)
    """Most prompts (or texts to classify) in one request."""
    batch_max_rows: int = Field(16, ge=1)
    """Most rows (prompts or texts of concurrent requests that can share a forward pass) run
    together on a replica, in a batch or a continuous batch; 1 runs each request alone."""
    batch_wait_ms: float = Field(5.0, ge=0)
    """How long an idle replica waits for requests sent at the same moment to join its batch."""
    continuous_batching: bool = True
    """Generations batch continuously: a request that arrives while a batch generates joins it at
    its next forward pass (in `adapter` mode whatever its version; any `max_tokens` and
    temperature), and each request is answered as soon as its rows end. Off: requests of one
    version, operation and sampling form a batch that runs to its end before the next starts."""
    draft_tokens: int = Field(4, ge=0, le=16)
    """In a continuous batch, a greedy row reads up to this many drafted tokens per pass beside
    its last one: those that followed the first earlier occurrence of its last 3 tokens in its
    own prompt and answer or in another request's of the same version; it keeps those the model
    agrees with (answers unchanged). 0: none."""
    members: list[str] = Field(default_factory=list)
    """More registered models on the same base (a fleet's members), served by the same replicas
    beside `model_name`, each following its own aliases: a request picks one with
    `model: NAME`, `NAME@ALIAS` or `NAME/VERSION`; `model_name` is the default."""
    max_adapters_per_replica: int = Field(64, ge=1)
    """Adapters kept attached per replica; past it (or past `max_adapter_memory_mb`) the least
    recently used one is detached, and attached again when a request names it."""
    max_adapter_memory_mb: float | None = Field(1024.0, gt=0)
    """Memory the attached adapters' weights may take per replica, in MiB (null: by count only)."""
    num_replicas: int = Field(1, ge=1)
    """Model replicas (each holds one copy of the base)."""
    trust_remote_code: bool = False
    """Allow model code from the hub when loading the base; off unless you trust it."""
    token_secret_block: str | None = None
    """Name of a Prefect Secret block holding the bearer token (the env var PREFECT_LORA_SERVE_TOKEN wins)."""
    device: str = "cpu"
    """Torch device of the model replicas (`cuda` gives each replica one GPU)."""
    request_timeout_s: float = Field(60.0, gt=0)
    """Longest a request may take end to end; it is answered 504 and its work cancelled after."""
    signals_interval_s: float | None = Field(60.0, gt=0)
    """How often each served version's live signals are summarised to MLflow (metrics `live/...`
    on the version's run, the version tag `live.signals`) and, where a Prefect API is configured,
    to Prefect as events; null: on `/metrics` only."""
    signals_window_s: float = Field(300.0, gt=0)
    """The recent window of `/metrics`' latency quantiles (its counters run from the start)."""
    allow_unauthenticated: bool = False
    """Serve on a non-loopback `host` with no bearer token: refused unless this is true (for a
    network that already authenticates, e.g. behind a gateway)."""
    rollout: RolloutConfig | None = None
    """A staged rollout after each promotion: the new champion takes `steps` of the traffic beside
    the previous one, advancing on live signals no worse than its, rolled back on worse ones;
    null: a promotion takes all traffic at once."""

    @property
    def served(self) -> list[str]:
        """Every registered model this app serves, the default (`model_name`) first."""
        return list(dict.fromkeys([self.model_name, *self.members]))


def served_key(name: str, version: str) -> str:
    """The multiplexed model id of one version of one served model (a replica loads it once)."""
    return f"{name}/{version}"


def split_key(key: str) -> tuple[str, str]:
    name, _, version = key.rpartition("/")
    return name, version


def read_aliases(cfg: ServeConfig) -> dict[str, dict[str, str]]:
    """Every served model's aliases (alias -> version); a member not registered yet has none
    until it is (the default model must exist: it fixes the replicas' base)."""
    from mlflow.exceptions import MlflowException
    from prefect_lora.lora_tasks.registry import registry, tracking

    c = tracking.client(cfg.tracking_uri)
    read = {cfg.model_name: registry.require_model(c, cfg.model_name).aliases}
    for name in cfg.members:
        try:
            read[name] = c.get_registered_model(name).aliases
        except MlflowException:
            read[name] = {}
    return {name: {a: str(v) for a, v in aliases.items()} for name, aliases in read.items()}


def load_serve_config(path: str | os.PathLike | None = None, **overrides: Any) -> ServeConfig:
    """A ServeConfig from an optional YAML file plus keyword overrides (None values are ignored:
    an option not given leaves the file's value). Every problem is one ValueError naming the fix."""
    raw: dict = _read_serve_yaml(Path(path)) if path else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServeConfig(**raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"serve config is invalid: {problems}") from None


def _read_serve_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"serve config {path}: {'is a folder' if path.is_dir() else 'no such file'}; "
                         "give a YAML file like deploy/serve.yaml")
    try:
        raw = read_yaml(path, "serve config")
        raw = plain(raw, source="serve config")  # aliases expanded within bounds, huge numbers refused by key
    except ConfigError as exc:
        raise ValueError(f"serve config {path}: {'; '.join(exc.problems)}") from None
    except OSError as exc:
        raise ValueError(f"serve config {path}: cannot read it ({exc.strerror or exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"serve config {path}: the top level must be a mapping of settings (key: value), "
                         f"not a {type(raw).__name__}")
    return raw


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeConfig, token: object | None) -> None:
    """Refuse to listen beyond this machine with no token, unless `allow_unauthenticated`."""
    if token is None and not is_loopback(cfg.host) and not cfg.allow_unauthenticated:
        raise ValueError(
            f"refusing to serve on {cfg.host} without a bearer token: anyone who reaches the port could use "
            f"the model. Set {TOKEN_ENV} (or token_secret_block), bind to 127.0.0.1, or set "
            "allow_unauthenticated: true in the serve config"
        )


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    def __init__(self, value: str):
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def resolve_token(cfg: ServeConfig) -> Secret | None:
    """The bearer token: env PREFECT_LORA_SERVE_TOKEN, else the configured Prefect Secret block, else none."""
    value = os.environ.get(TOKEN_ENV)
    if not value and cfg.token_secret_block:
        try:
            from prefect.blocks.system import Secret as SecretBlock  # only when a block is configured
        except ImportError:
            raise ValueError("token_secret_block is set but prefect is not installed here") from None
        try:
            value = SecretBlock.load(cfg.token_secret_block).get()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"cannot load the Prefect Secret block {cfg.token_secret_block!r} ({exc.__class__.__name__}); "
                f"create it (prefect block create secret) or set {TOKEN_ENV}"
            ) from None
    return Secret(str(value)) if value else None


class RequestProblem(Exception):
    """A request the server refuses, with the HTTP status, a message for the caller that says
    what to send instead, and the request field at fault (`param`, as OpenAI's errors name it)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        self.status, self.message, self.kind, self.param = status, message, kind, param
        super().__init__(message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status, "param": self.param}}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 40


def shown(value: Any) -> str:
    """A request's value as an error message quotes it: short (a long string, a deep or long
    list is cut), control characters, lone surrogates and bidi marks escaped."""
    return _REPR.repr(value)


class HugeNumber:
    """An integer literal in a request body longer than any setting takes (`MAX_NUMBER_DIGITS`):
    kept as its length, so that the field's own check refuses it by name (Python refuses to read
    integers of more than 4,300 digits, and nothing here needs more than 20)."""

    def __init__(self, literal: str):
        self.digits = len(literal.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


MAX_NUMBER_DIGITS = 30
MAX_VERSION = 2**31 - 1
"""The largest version number MLflow's registry can hold (an SQL INTEGER)."""
MAX_ALIAS_CHARS = 255
"""The longest alias MLflow accepts."""


def _json_int(literal: str) -> int | HugeNumber:
    return HugeNumber(literal) if len(literal) > MAX_NUMBER_DIGITS else int(literal)


def check_auth(authorization: str | None, token: Secret | None) -> None:
    """Pass when no token is configured or the header is `Bearer <token>`; else 401."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestProblem(401, "missing bearer token: send the header 'Authorization: Bearer <token>'",
                             "authentication_error")
    if not hmac.compare_digest(given.strip().encode(), token.get().encode()):
        raise RequestProblem(401, "invalid bearer token", "authentication_error")


def check_body_size(size: int | str | None, cfg: ServeConfig) -> None:
    """413 past `max_body_bytes`: for the declared Content-Length, then for the bytes read so far."""
    try:
        size = int(size or 0)
    except ValueError:
        raise RequestProblem(400, f"Content-Length {shown(size)} is not a number of bytes: send the body's size "
                                  "in bytes, or no Content-Length") from None
    if size > cfg.max_body_bytes:
        raise RequestProblem(413, f"request body is over {cfg.max_body_bytes} bytes (at least {size}); "
                                  f"the limit is {cfg.max_body_bytes}")


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object. An integer too long for any setting is read as a
    `HugeNumber`, which the field's own check refuses by name."""
    try:
        data = json.loads(body or b"null", parse_int=_json_int)
    except (ValueError, UnicodeDecodeError):
        raise RequestProblem(400, "request body is not valid JSON: send a UTF-8 JSON object like "
                                  '{"prompt": "..."}') from None
    except RecursionError:
        raise RequestProblem(400, "request body nests JSON too deeply: send a flat JSON object like "
                                  '{"prompt": "..."}') from None
    if not isinstance(data, dict):
        raise RequestProblem(400, f"request body must be a JSON object like {{\"prompt\": \"...\"}}, not {shown(data)}")
    return data


def parse_model_field(model: Any, names: str | list[str]) -> tuple[str, str]:
    """The served model and the alias or version a request's `model` names: NAME, NAME@ALIAS,
    NAME/VERSION, or ALIAS or VERSION of the first of `names` (the default model).

    Absent means the default model's champion. A version or alias that no registry can hold (past
    `MAX_VERSION`, longer than `MAX_ALIAS_CHARS`) is a 404 here, before any lookup."""
    names = [names] if isinstance(names, str) else list(names)
    if model is None or model == "" or model in names:
        return (model or names[0]), "champion"
    if not isinstance(model, str):
        raise RequestProblem(400, f"'model' must be a string like {names[0]}, {names[0]}@champion or {names[0]}/3, "
                                  f"not {shown(model)}", param="model")
    name, ref = names[0], model
    if "@" in model or "/" in model:
        sep = "@" if "@" in model else "/"
        name, _, ref = model.rpartition(sep) if sep == "/" else model.partition(sep)
        if name not in names:
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise RequestProblem(404, f"this server serves {listed}, not {shown(name)}; use model={names[0]}@champion or "
                                      f"{names[0]}/VERSION (GET /v1/models lists them)", "model_not_found", "model")
    ref = ref.removeprefix("v") if ref[:1] == "v" and is_version(ref[1:]) else ref
    digits = ref.lstrip("0")  # (Python reads no integer of more than 4,300 digits, leading zeros included)
    if is_version(ref) and digits:
        if len(digits) > len(str(MAX_VERSION)) or int(digits) > MAX_VERSION:
            raise RequestProblem(404, f"{name} has no version {shown(digits)} ({len(digits)} digits): registered "
                                      f"versions run from 1 to at most {MAX_VERSION}; use {name}/VERSION with a "
                                      f"registered one, or {name}@champion", "model_not_found", "model")
        return name, canonical_version(digits)  # `3`, `03` and `v3` are one model, loaded once
    if not ref or not ref.isascii() or not ref.replace("-", "").replace("_", "").isalnum() or ref.isdigit():
        raise RequestProblem(400, f"cannot read model {shown(model)}: use {name}, {name}@ALIAS or {name}/VERSION "
                                  "(a version in ASCII digits)", param="model")
    if len(ref) > MAX_ALIAS_CHARS:
        raise RequestProblem(404, f"{name} has no alias {shown(ref)}: aliases have at most {MAX_ALIAS_CHARS} characters; "
                                  f"use {name}@champion or {name}/VERSION", "model_not_found", "model")
    return name, ref


def choose_alias(ref: str, canary_share: float, has_challenger: bool, rng: random.Random | None = None) -> str:
    """Route a champion-bound request to the challenger with probability `canary_share`."""
    if ref == "champion" and has_challenger and canary_share > 0 and (rng or random).random() < canary_share:
        return "challenger"
    return ref


def _check_unicode(text: str, field: str) -> None:
    """Text a tokenizer can read: no lone surrogate (JSON's `"\\ud800"` decodes to one, UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestProblem(400, f"'{field}' holds a lone surrogate ({shown(text[exc.start])} at character "
                                  f"{exc.start}), which is not text: send valid Unicode (pair each \\ud800-\\udbff "
                                  "escape with a \\udc00-\\udfff one)", param=field) from None


def _texts(value: Any, field: str, cfg: ServeConfig) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise RequestProblem(400, f"'{field}' must be a string or a non-empty list of strings, not {shown(value)}",
                             param=field)
    if len(items) > cfg.max_batch:
        raise RequestProblem(400, f"'{field}' holds {len(items)} items; at most {cfg.max_batch} per request", param=field)
    for x in items:
        if len(x) > cfg.max_prompt_chars:
            raise RequestProblem(400, f"'{field}' has a text of {len(x)} characters; the limit is {cfg.max_prompt_chars}",
                                 param=field)
        _check_unicode(x, field)
    return items


def _max_tokens(body: dict, cfg: ServeConfig) -> int:
    default = min(cfg.default_max_tokens, cfg.max_tokens_cap)
    n = body.get("max_tokens", default)
    if n is None:
        n = default
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RequestProblem(400, f"'max_tokens' must be a positive integer (at most {cfg.max_tokens_cap}), "
                                  f"not {shown(n)}", param="max_tokens")
    if n > cfg.max_tokens_cap:
        raise RequestProblem(400, f"'max_tokens' is {shown(n)}; this server allows at most {cfg.max_tokens_cap}",
                             param="max_tokens")
    return n


def _temperature(body: dict) -> float:
    t = body.get("temperature", 0)
    if t is None:
        return 0.0
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not (t == 0 or MIN_TEMPERATURE <= t <= 2):
        raise RequestProblem(400, f"'temperature' must be 0 (greedy) or a number from {MIN_TEMPERATURE} to 2, "
                                  f"not {shown(t)}", param="temperature")
    return float(t)


MIN_TEMPERATURE = 0.01
"""Below it, logits divided by the temperature overflow to inf: use 0 for greedy decoding."""


def parse_completion(body: dict, cfg: ServeConfig) -> dict:
    if "prompt" not in body:
        raise RequestProblem(400, "'prompt' is required: a text or a list of texts", param="prompt")
    return {"prompts": _texts(body["prompt"], "prompt", cfg), "max_tokens": _max_tokens(body, cfg),
            "temperature": _temperature(body)}


def parse_chat(body: dict, cfg: ServeConfig) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestProblem(400, "'messages' must be a non-empty list of {role, content} objects, "
                                  f"not {shown(messages)}", param="messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise RequestProblem(400, "each of 'messages' needs a role (system, user or assistant) and a string "
                                      f"content, not {shown(m)}", param="messages")
        _check_unicode(m["content"], "messages")
        clean.append({"role": m["role"], "content": m["content"]})
    total = sum(len(m["content"]) for m in clean)
    if total > cfg.max_prompt_chars:
        raise RequestProblem(400, f"'messages' hold {total} characters in all; the limit is {cfg.max_prompt_chars}",
                             param="messages")
    if not any(m["role"] == "user" for m in clean):
        raise RequestProblem(400, "'messages' needs at least one user message", param="messages")
    return {"messages": clean, "max_tokens": _max_tokens(body, cfg), "temperature": _temperature(body)}


def parse_classify(body: dict, cfg: ServeConfig) -> dict:
    if "input" not in body:
        raise RequestProblem(400, "'input' is required: a text or a list of texts", param="input")
    return {"texts": _texts(body["input"], "input", cfg)}


PARSERS = {"complete": parse_completion, "chat": parse_chat, "classify": parse_classify}
"""Each inference route's (`Gateway`'s `op`) reading of a request body into the replica's payload."""


def parse_request(op: str, body: dict, cfg: ServeConfig) -> tuple[str, str, dict]:
    """What an inference route reads of a request's JSON body, in its order: the payload the
    replica runs (`PARSERS`), then the served model and the alias or version it names. Every
    problem is a RequestProblem: a 4xx naming the field and what to send."""
    payload = PARSERS[op](body, cfg)
    name, ref = parse_model_field(body.get("model"), cfg.served)
    return name, ref, payload


def user_texts(payload: dict) -> list[str] | None:
    """What the user wrote for each answer of a generation request (its prompts; a chat's last
    user message), for the live check that an answer stays on its prompt; None for a classification."""
    if "prompts" in payload:
        return payload["prompts"]
    if "messages" in payload:
        return [next(m["content"] for m in reversed(payload["messages"]) if m["role"] == "user")]
    return None


def per_row(values: list, sizes: list[int]) -> list:
    """Each request's value repeated for each of its rows."""
    return [v for v, n in zip(values, sizes) for _ in range(n)]


def split_rows(rows: dict[str, list], sizes: list[int]) -> list[dict]:
    """Per-row lists of a batch's result cut into one result per request of `sizes` rows; token
    counts are summed per request."""
    out, start = [], 0
    for size in sizes:
        part = {k: v[start : start + size] for k, v in rows.items()}
        for k in ("prompt_tokens", "completion_tokens"):
            if k in part:
                part[k] = int(sum(part[k]))
        out.append(part)
        start += size
    return out


def notify_server(url: str, token: str | None = None, timeout_s: float = 60.0) -> dict:
    """Ask a running server to re-read its aliases now (POST /admin/refresh); returns its answer."""
    import urllib.request

    if not url.rstrip("/").endswith("/admin/refresh"):
        url = url.rstrip("/") + "/admin/refresh"
    token = token or os.environ.get(TOKEN_ENV)
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read() or b"{}")


class MicroBatcher:
    """Concurrent requests run as one forward pass. Requests with the same key (version,
    operation, sampling) that wait while the model is busy, or arrive within `wait_s` of each
    other, are joined in arrival order up to `max_rows` rows; `run(key, items)` runs one batch
    at a time in a thread and returns one result per item (an exception fails only its item).
    A request whose caller gave up (cancelled) is left out of the batch that would have run it.

    A request submitted `streamed` runs with `stream(key, intake)` instead: a batch that takes in
    the requests of its key that arrive while it runs and answers each as soon as it is done
    (`Intake`: continuous batching)."""

    def __init__(self, run, max_rows: int, wait_s: float, stream=None):
        self._run, self._stream, self.max_rows, self.wait_s = run, stream, max_rows, wait_s
        self._queue: list[tuple[object, object, int, asyncio.Future, bool]] = []
        self._queue_lock = threading.Lock()  # a streamed batch takes from the queue in its own thread
        self._worker: asyncio.Task | None = None
        self.batches: deque[int] = deque(maxlen=1000)
        """Rows of the latest forward passes: each batch, or each decoding step of a streamed one
        (for tests and logs)."""
        self.rows_seen: Counter[int] = Counter()
        """Forward passes by their rows, since the start (for the bench)."""
        self.joins: deque[tuple[int, int, int]] = deque(maxlen=1000)
        """(batch number, step, rows) of the requests a streamed batch took in after it started."""
        self.started = 0
        """Batches started so far (a streamed batch's number)."""
        self.drafts = [0, 0]
        """Draft tokens the passes of streamed batches read, and those they kept (`RunningBatch`'s drafts)."""

    async def submit(self, key, item, rows: int = 1, streamed: bool = False):
        future = asyncio.get_running_loop().create_future()
        with self._queue_lock:
            self._queue.append((key, item, rows, future, streamed))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    def _take(self, key, room: int, stop_at_other: bool = False) -> list[tuple]:
        """The waiting requests with `key` in arrival order, up to `room` rows (the first always,
        when it leads the queue); with `stop_at_other`, none behind a request of another key (it
        goes next). Requests whose caller gave up are dropped."""
        with self._queue_lock:
            batch, rest, rows = [], [], 0
            for at, entry in enumerate(self._queue):
                if stop_at_other and entry[0] != key:
                    rest += self._queue[at:]
                    break
                if entry[0] == key and (not batch and not stop_at_other or rows + entry[2] <= room):
                    batch.append(entry)
                    rows += entry[2]
                else:
                    rest.append(entry)
            self._queue = rest
        return [e for e in batch if not e[3].done()]

    def _record(self, rows: int) -> None:
        self.batches.append(rows)
        self.rows_seen[rows] += 1

    async def _drain(self) -> None:
        while self._queue:
            if self.wait_s and sum(e[2] for e in self._queue) < self.max_rows:
                await asyncio.sleep(self.wait_s)  # let requests sent at the same moment join
            batch = self._take(self._queue[0][0], self.max_rows)
            if not batch:
                continue
            self.started += 1
            if batch[0][4] and self._stream is not None:
                await self._run_streamed(batch)
                continue
            self._record(sum(e[2] for e in batch))
            try:
                results = await asyncio.to_thread(self._run, batch[0][0], [e[1] for e in batch])
            except Exception as exc:  # noqa: BLE001  (the whole batch failed: each caller gets the error)
                results = [exc] * len(batch)
            for (_, _, _, future, _), result in zip(batch, results):
                _settle(future, result)

    async def _run_streamed(self, batch: list[tuple]) -> None:
        intake = Intake(self, batch, asyncio.get_running_loop())
        try:
            await asyncio.to_thread(self._stream, batch[0][0], intake)
        except Exception as exc:  # noqa: BLE001  (the batch failed: each caller not answered yet gets the error)
            intake.fail(exc)
        else:
            intake.fail(RuntimeError("the batch ended without answering this request"))


def _settle(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Intake:
    """A streamed batch's side of its `MicroBatcher`, used from the thread that runs the batch:
    the requests it takes in (`take`: its first ones, then those of its key that arrived since,
    within `max_rows` rows of what still runs, none while a request of another key waits),
    whether a caller gave up (`gone`), each answer as soon as it is ready (`answer`), and its
    forward passes (`stepped`: the batcher's records). Requests are known by ticket."""

    def __init__(self, batcher: MicroBatcher, first: list[tuple], loop: asyncio.AbstractEventLoop):
        self._batcher, self._loop, self.key = batcher, loop, first[0][0]
        self.number, self.step = batcher.started, 0
        self._first: list[tuple] | None = first
        self._open: dict[int, tuple] = {}  # ticket -> entry, not answered yet
        self._tickets = 0

    def take(self, running_rows: int) -> list[tuple[int, object, int]]:
        """(ticket, item, rows) of each request to take in now, in arrival order."""
        if self._first is not None:
            entries, self._first = self._first, None
        else:
            entries = self._batcher._take(self.key, self._batcher.max_rows - running_rows, stop_at_other=True)
            if entries and self.step:
                self._batcher.joins.append((self.number, self.step, sum(e[2] for e in entries)))
        taken = []
        for entry in entries:
            self._tickets += 1
            self._open[self._tickets] = entry
            taken.append((self._tickets, entry[1], entry[2]))
        return taken

    def gone(self, ticket: int) -> bool:
        """Whether the request's caller gave up (its answer would go nowhere)."""
        return ticket not in self._open or self._open[ticket][3].done()

    def answer(self, ticket: int, result) -> None:
        """Send a request its result (or the exception that fails it alone)."""
        entry = self._open.pop(ticket, None)
        if entry is not None:
            self._loop.call_soon_threadsafe(_settle, entry[3], result)

    def stepped(self, rows: int, drafted: tuple[int, int] = (0, 0)) -> None:
        """Record one forward pass over `rows` rows, which read `drafted[0]` draft tokens and kept `drafted[1]`."""
        self.step += 1
        self._batcher._record(rows)
        self._batcher.drafts[0] += drafted[0]
        self._batcher.drafts[1] += drafted[1]

    def fail(self, exc: BaseException) -> None:
        """Fail every request not answered yet (called in the event loop when the batch ends)."""
        for entry in self._open.values():
            _settle(entry[3], exc)
        self._open.clear()
