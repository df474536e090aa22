"""Serve a registered model's adapters over HTTP with Ray Serve, following its `champion` alias.

Two deployments:

- `Gateway` (FastAPI ingress): auth, request limits, OpenAI-compatible routes, alias -> version
  resolution, the optional canary share, and a background poll of the aliases. A swap (poll,
  `POST /admin/refresh`, or `handle.refresh.remote()`) first loads the new version on a replica
  and only then points the alias at it; requests already routed to the old version finish on it.
  With `rollout` configured, a promoted champion takes traffic in steps (`rollout_control`).
- `AdapterModel` (or `MergedModel`): loads the base once per replica and attaches adapters by
  version with `@serve.multiplexed`; the router sends each version to a replica that holds it.

One app can serve many registered models of one base (a fleet's members, `members`): each
follows its own aliases, a request names one (`model: NAME@ALIAS`), and a replica keeps the
most recently used adapters attached, by count and by memory.

Adapters load from safetensors only; `trust_remote_code` stays off unless configured; the bearer
token is never logged (it travels as a `Secret`, whose repr is masked).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on the routes.
import asyncio
import contextlib
import inspect
import json
import logging
import os
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prefect_lora.deploy.adapters import AdapterSet
from prefect_lora.deploy.live_export import PROMETHEUS_TEXT, LiveSignals
from prefect_lora.deploy.rollout_control import Rollouts, resolve_webhook
from prefect_lora.deploy.serve_core import (
    MicroBatcher, RequestProblem, Secret, ServeConfig, check_auth, check_body_size, check_exposure, choose_alias,
    parse_json, parse_request, per_row, read_aliases, resolve_token, served_key, split_key, split_rows, user_texts,
)
from prefect_lora.lora_tasks.versions import is_version
from ray import serve

logger = logging.getLogger("ray.serve")
SERVE_CACHE = 1024  # Serve's own per-replica LRU of model ids; a replica's adapters are bounded by its config
ROUTE_TASK = {"complete": "causal_lm", "chat": "causal_lm", "classify": "sequence_classification"}
ROUTE_NAME = {"complete": "/v1/completions", "chat": "/v1/chat/completions", "classify": "/v1/classify"}


# ----------------------------------------------------------------------------- model replicas


class _Replica:
    """What both replica kinds share: the version files, the tokenizer, and inference."""

    def _setup(self, cfg: dict) -> None:
        import torch
        from prefect_lora.deploy.decoding import ModelLock, decode_continuously
        from prefect_lora.lora_tasks.modeling import load_tokenizer

        self.cfg = ServeConfig(**cfg)
        self.device = torch.device(self.cfg.device)
        self._lock = ModelLock()  # one forward pass at a time: adapters switch per batch
        self._batcher = MicroBatcher(  # a continuous batch (a generation's) takes in requests as they arrive
            self._infer_batch, self.cfg.batch_max_rows, self.cfg.batch_wait_ms / 1000, stream=lambda key, intake:
            decode_continuously(intake, self._prepare, self._routing, self._lock, self.tokenizer, self.device,
                                self.cfg.draft_tokens))
        self.joins_rows = False  # whether generations batch continuously: set with the model (`_joins_rows`)
        self._files: dict[str, object] = {}
        first = self._first_version()
        self.base_config = self._files_for(first).model_config
        self.task = self.base_config["task"]
        self.tokenizer = load_tokenizer(self.base_config["base_model"], self.base_config.get("revision"),
                                        trust_remote_code=self.cfg.trust_remote_code)

    def _first_version(self) -> str:
        """The key of the default model's version that fixes the replica's base (its champion)."""
        from prefect_lora.lora_tasks.registry import registry, tracking

        c, name = tracking.client(self.cfg.tracking_uri), self.cfg.model_name
        model = registry.require_model(c, name)
        for alias in ("champion", "challenger"):
            if alias in model.aliases:
                return served_key(name, str(model.aliases[alias]))
        versions = c.search_model_versions(f"name = '{name}'")
        if not versions:
            raise RuntimeError(f"{name!r} has no registered versions to serve")
        return served_key(name, str(max(int(v.version) for v in versions)))

    def _files_for(self, key: str):
        from prefect_lora.lora_tasks.registry import registry

        if key not in self._files:
            name, version = split_key(key)
            files = registry.download_version(self.cfg.tracking_uri, name, version)
            if hasattr(self, "base_config"):
                mine = (self.base_config.get("base_model"), self.base_config.get("revision"), self.base_config.get("task"))
                theirs = (files.model_config.get("base_model"), files.model_config.get("revision"), files.model_config.get("task"))
                if mine != theirs:
                    raise RequestProblem(409, f"{name} version {version} was trained on {theirs[0]} ({theirs[2]}), not on "
                                              f"the served base {mine[0]} ({mine[2]}); serve it in its own application")
            self._files[key] = files
        return self._files[key]

    async def warm(self) -> str:
        """Load the request's version (multiplexed model id) so the next request finds it ready."""
        await self.get_model(serve.get_multiplexed_model_id())
        return serve.get_multiplexed_model_id()

    async def run(self, op: str, payload: dict) -> dict:
        """Serve one request for the version named by the multiplexed model id, in a batch with
        the concurrent requests it can share a forward pass with (`_batch_key`, `MicroBatcher`)."""
        from prefect_lora.lora_tasks.errors import LoraTaskError, RegistryError

        version = serve.get_multiplexed_model_id()
        try:
            if ROUTE_TASK[op] != self.task:
                route = "/v1/classify" if self.task == "sequence_classification" else "/v1/completions or /v1/chat/completions"
                raise RequestProblem(400, f"{split_key(version)[0]} is a {self.task} model: use {route}, not {ROUTE_NAME[op]}")
            model = await self.get_model(version)
            rows = len(payload.get("prompts") or payload.get("texts") or [None])
            streamed = self.joins_rows and op != "classify"
            # a continuous batch takes completions and chats at any temperature: each row samples its own
            key = self._batch_key(version, *(("generate", None) if streamed else (op, payload.get("temperature"))))
            return await self._batcher.submit(key, (version, model, {**payload, "op": op}), rows, streamed=streamed)
        except RequestProblem as exc:
            return {"error": exc.message, "status": exc.status, "type": exc.kind}
        except RegistryError as exc:
            return {"error": str(exc), "status": 404, "type": "model_not_found"}
        except LoraTaskError as exc:
            return {"error": str(exc), "status": 400, "type": "invalid_request_error"}
        except Exception as exc:  # (one failed request must not take the replica down)
            logger.exception("inference failed for version %s", version)
            return {"error": f"internal error ({exc.__class__.__name__})", "status": 500, "type": "server_error"}

    def _batch_key(self, version: str, op: str, temperature) -> tuple:
        """Requests that may share one forward pass: the same version, operation and sampling."""
        return (version, op, temperature)

    def _infer_batch(self, key: tuple, items: list[tuple]) -> list:
        """One forward pass (a classification) or one `generate` per prompt style for the
        requests of a batch (`(version, model, payload)` each): one result per request, or the
        RequestProblem of a request that cannot run."""
        from prefect_lora.deploy.decoding import generate_rows, prompt_texts

        op, temperature = key[-2:]
        with self._lock:
            model, names = self._activate(items)
            mcfgs = [self._files_for(version).model_config for version, _, _ in items]
            if op == "classify":
                return self._classify_requests(model, names, mcfgs, items)
            prepared = [prompt_texts(self.tokenizer, mcfg, payload) for mcfg, (_, _, payload) in zip(mcfgs, items)]
            results: dict[int, object] = {i: problem for i, p in enumerate(prepared)
                                          if (problem := self._prompt_problem(op, [len(x) for x in p[2]]))}
            for special in {p[1] for i, p in enumerate(prepared) if i not in results}:  # one generate per prompt style
                group = [i for i, p in enumerate(prepared) if p[1] == special and i not in results]
                sizes = [len(prepared[i][0]) for i in group]
                texts = [t for i in group for t in prepared[i][0]]
                with self._by_row(per_row([names[i] for i in group], sizes) if names else None) as extra:
                    out = generate_rows(model, self.tokenizer, texts, special,
                                        per_row([items[i][2]["max_tokens"] for i in group], sizes), temperature,
                                        self.device, **extra)
                results.update(zip(group, split_rows(out, sizes)))
            return [results[i] for i in range(len(items))]

    def _prepare(self, item: tuple):
        """A generation request's prompts' token ids, each row's `max_tokens`, its temperature and
        its version (rows of one version share cached prompt tokens), or the RequestProblem that
        refuses it."""
        from prefect_lora.deploy.decoding import prompt_texts

        version, _, payload = item
        _, _, ids = prompt_texts(self.tokenizer, self._files_for(version).model_config, payload)
        if problem := self._prompt_problem(payload["op"], [len(x) for x in ids]):
            return problem
        return ids, [payload["max_tokens"]] * len(ids), payload["temperature"], version

    @contextlib.contextmanager
    def _routing(self, items: list[tuple]):
        """The model readied for a packed pass whose token i is of request `items[i]`, and the
        forward's extra arguments for it (each token's adapter)."""
        model, names = self._activate(items)
        with self._by_token(names) as extra:
            yield model, extra

    def _classify_requests(self, model, names: list[str] | None, mcfgs: list[dict], items: list[tuple]) -> list:
        """`_infer_batch` for classifications: one forward pass over the texts of every request that can run."""
        lengths = [[len(ids) for ids in self.tokenizer(p["texts"])["input_ids"]] for _, _, p in items]
        results: dict[int, object] = {i: problem for i, n in enumerate(lengths)
                                      if (problem := self._prompt_problem("classify", n))}
        run = [i for i in range(len(items)) if i not in results]
        sizes = [len(items[i][2]["texts"]) for i in run]
        if run:
            texts = [t for i in run for t in items[i][2]["texts"]]
            rows = per_row([names[i] for i in run], sizes) if names else None
            out = self._classify(model, per_row([mcfgs[i] for i in run], sizes), texts, rows)
            results.update(zip(run, split_rows(out, sizes)))
        return [results[i] for i in range(len(items))]

    def _prompt_problem(self, op: str, lengths: list[int]) -> RequestProblem | None:
        """Why a request's texts (their `lengths` in tokens) cannot run, if they cannot: refused
        before its batch runs, so that it fails alone."""
        field = {"chat": "messages", "classify": "input"}.get(op, "prompt")
        if op != "classify" and max(lengths) > self.cfg.max_prompt_tokens:  # (a classifier truncates)
            return RequestProblem(400, f"prompt is {max(lengths)} tokens; the limit is {self.cfg.max_prompt_tokens}",
                                  param=field)
        if min(lengths) == 0:  # nothing to run on: a tokenizer with no start token reads nothing in an empty text
            return RequestProblem(400, f"'{field}' holds a text of no tokens (an empty text, for this model): send at "
                                       "least one character", param=field)
        return None

    def _activate(self, items: list[tuple]) -> tuple:
        """The model a batch runs on, and each request's adapter name (None: one model, no names)."""
        return items[0][1], None

    def _joins_rows(self, model) -> bool:
        """Whether this replica's generations batch continuously, on `model` made ready for it."""
        from prefect_lora.deploy.decoding import use_rows_attention

        return self.cfg.continuous_batching and self.task == "causal_lm" and use_rows_attention(model)

    def _by_row(self, adapter_names: list[str] | None):
        """Within: each row of a generation runs through its own adapter; yields what `generate`
        needs for it (one model: nothing)."""
        return contextlib.nullcontext({})

    _by_token = _by_row  # (the same for each token of a packed pass)

    def _classify(self, model, mcfgs: list[dict], texts: list[str], adapter_names: list[str] | None = None) -> dict:
        """Each text's label (by its own version's label list, `mcfgs` per row) and score."""
        import torch

        longest = max(int(m.get("max_seq_length", 512)) for m in mcfgs)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=longest, return_tensors="pt").to(self.device)
        with torch.no_grad():
            probs = model(**enc, **({"adapter_names": adapter_names} if adapter_names else {})).logits.softmax(-1)
        score, idx = probs.max(-1)
        labels = [m.get("labels") or [] for m in mcfgs]
        return {"labels": [str(lab[i]) if i < len(lab) else str(i) for lab, i in zip(labels, idx.tolist())],
                "scores": score.tolist()}


class _LoadedAdapter:
    """What the multiplexer caches per version; unloading it detaches the adapter from the base."""

    def __init__(self, owner: "AdapterModel", key: str):
        self.owner, self.key, self._gone = owner, key, False

    def __del__(self):  # called by Serve on LRU eviction (and later by the GC: idempotent)
        if not self._gone:
            self._gone = True
            self.owner._unload(self.key)


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class AdapterModel(_Replica):
    """One base model per replica; adapters attached by (model, version) (`AdapterSet`: the most
    recently used stay, within `max_adapters_per_replica` and `max_adapter_memory_mb`), one
    active or several routed by row per batch."""

    def __init__(self, cfg: dict):
        import torch
        from prefect_lora.lora_tasks.modeling import load_base_model

        self._setup(cfg)
        labels = self.base_config.get("labels")
        self.base = load_base_model(
            self.base_config["base_model"], self.task, revision=self.base_config.get("revision"),
            num_labels=len(labels) if labels else None, torch_dtype=self.base_config.get("torch_dtype") or "float32",
            trust_remote_code=self.cfg.trust_remote_code, pad_token_id=self.tokenizer.pad_token_id,
        ).to(self.device)
        torch.manual_seed(int(self.base_config.get("seed", 0)))  # a classifier's fresh head, as in training
        self.joins_rows = self._joins_rows(self.base)
        mb = self.cfg.max_adapter_memory_mb
        self.adapters = AdapterSet(self.base, self.task, self._files_for, self.cfg.max_adapters_per_replica,
                                   mb * 2**20 if mb else None)
        logger.info("base model %s loaded once for %s%s", self.base_config["base_model"], self.cfg.model_name,
                    f" and {len(self.cfg.members)} more model(s)" if self.cfg.members else "")

    def _load_sync(self, key: str) -> None:
        with self._lock:
            self.adapters.ensure(key)

    def _unload(self, key: str) -> None:
        with self._lock:
            self.adapters.detach(key)

    def stats(self) -> dict:
        """What this replica holds (`AdapterSet.stats`), its largest batch, its forward passes by
        rows, the requests its continuous batches took in while running, and resident memory."""
        import psutil

        b = self._batcher
        return {**self.adapters.stats(), "largest_batch_rows": max(b.batches, default=0),
                "passes_by_rows": dict(b.rows_seen), "joins": list(b.joins),
                "draft_tokens": {"read": b.drafts[0], "kept": b.drafts[1]},
                "rss_bytes": psutil.Process().memory_info().rss}

    @serve.multiplexed(max_num_models_per_replica=SERVE_CACHE)
    async def get_model(self, key: str) -> _LoadedAdapter:
        await asyncio.to_thread(self._load_sync, key)
        return _LoadedAdapter(self, key)

    def _batch_key(self, version: str, op: str, temperature) -> tuple:
        """Requests for any adapter share a forward pass: each row runs its own (`AdapterSet.by_row`),
        each token in a continuous batch (`by_token`: plain LoRA layers only; other adapters batch
        by version there)."""
        if op == "generate" and not self.adapters.routes_rows([self.adapters.name_of(version)]):
            return (version, op, temperature)
        return ("adapters", op, temperature)

    def _activate(self, items: list[tuple]) -> tuple:
        return self.adapters.activate([version for version, _, _ in items])

    def _by_row(self, adapter_names: list[str] | None):
        return self.adapters.by_row(adapter_names)

    def _by_token(self, adapter_names: list[str] | None):
        return self.adapters.by_token(adapter_names) if adapter_names else contextlib.nullcontext({})


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class MergedModel(_Replica):
    """One merged model (base with the adapter folded in) per version: no adapter math per token."""

    def __init__(self, cfg: dict):
        self._setup(cfg)

    def _build(self, version: str):
        from prefect_lora.lora_tasks.registry.export import load_adapted

        model, _ = load_adapted(self._files_for(version), trust_remote_code=self.cfg.trust_remote_code)
        merged = model.merge_and_unload().to(self.device)
        merged.eval()
        self.joins_rows = self._joins_rows(merged)  # (every version has the replica's base)
        return merged

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, version: str):
        return await asyncio.to_thread(self._build, version)


# ----------------------------------------------------------------------------- HTTP gateway

async def _awaited(response):
    return await response


app = FastAPI(title="prefect-lora", docs_url=None, redoc_url=None, openapi_url=None)


class _AsciiJSON(JSONResponse):
    """JSON in ASCII: any string survives it, a lone surrogate a message quotes from a request included."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


@app.exception_handler(RequestProblem)
async def _problem(request: Request, exc: RequestProblem) -> JSONResponse:
    return _AsciiJSON(exc.body(), status_code=exc.status)


@app.exception_handler(Exception)
async def _failure(request: Request, exc: Exception) -> JSONResponse:
    """A fault of the server's own is still a JSON answer (Starlette logs it)."""
    problem = RequestProblem(500, f"internal error ({exc.__class__.__name__}); the server's log has it", "server_error")
    return _AsciiJSON(problem.body(), status_code=500)


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    async def __init__(self, model, cfg: dict, token: Secret | None, webhook: Secret | None = None):
        self.model, self.cfg, self.token = model, ServeConfig(**cfg), token
        self.served: dict[str, dict[str, str]] = {}  # model -> alias -> version
        self.swaps = 0
        self._refresh_lock = asyncio.Lock()
        self.live = LiveSignals(self.cfg.tracking_uri, self.cfg.signals_window_s, self.cfg.signals_interval_s)
        self.rollouts = Rollouts(self.cfg, self.live, self.refresh,
                                 lambda key: self.model.options(multiplexed_model_id=key).warm.remote(), webhook)
        await self.refresh()
        self._tasks = [asyncio.get_running_loop().create_task(job) for job in (  # held: the loop keeps weak references
            self._poll(), self.rollouts.run(), *([self.live.run()] if self.cfg.signals_interval_s else []))]

    # -- aliases

    @property
    def aliases(self) -> dict[str, str]:
        """The default model's aliases."""
        return self.served.get(self.cfg.model_name, {})

    async def refresh(self) -> dict:
        """Re-read every served model's aliases; load each moved alias's new version before
        pointing at it."""
        async with self._refresh_lock:
            new = await asyncio.to_thread(read_aliases, self.cfg)
            for name, aliases in new.items():
                before = self.served.get(name, {}).get("champion")
                self.served[name] = await self._swap(name, dict(self.served.get(name, {})), aliases)
                await self.rollouts.follow(name, before, self.served[name].get("champion"))
            return {"model": self.cfg.model_name, "aliases": dict(self.aliases), "swaps": self.swaps,
                    **({"models": {n: dict(a) for n, a in self.served.items()}} if self.cfg.members else {})}

    async def _swap(self, name: str, ready: dict[str, str], new: dict[str, str]) -> dict[str, str]:
        for alias, version in new.items():
            if ready.get(alias) == version:
                continue
            try:
                await self.model.options(multiplexed_model_id=served_key(name, version)).warm.remote()
            except Exception as exc:  # noqa: BLE001  (keep serving the old version)
                logger.error("%s@%s -> version %s not swapped: loading failed (%s)", name, alias, version, exc)
                continue
            await self.live.prepare(served_key(name, version))  # its answers are checked from the first
            logger.info("%s@%s now serves version %s (was %s)", name, alias, version, ready.get(alias))
            ready[alias] = version
            self.swaps += 1
        for alias in set(ready) - set(new):
            ready.pop(alias)
        return ready

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001  (MLflow down: keep serving what we have)
                logger.warning("alias poll failed: %s", exc)

    # -- request plumbing

    async def _guard(self, request: Request) -> dict:
        check_auth(request.headers.get("authorization"), self.token)
        check_body_size(request.headers.get("content-length"), self.cfg)
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body past the limit stops here
            size += len(chunk)
            check_body_size(size, self.cfg)
            chunks.append(chunk)
        return parse_json(b"".join(chunks))

    def _version(self, name: str, ref: str) -> str:
        if is_version(ref):  # canonical already (`parse_model_field`)
            return ref
        aliases = self.served.get(name, {})
        if ref not in aliases:
            models = f"; served models: {', '.join(self.cfg.served[:5])}{' ...' if len(self.cfg.served) > 5 else ''}" \
                if self.cfg.members else ""
            raise RequestProblem(404, f"{name} has no alias {ref!r}; served aliases: {sorted(aliases) or 'none'} "
                                      f"(promote a version first){models}", "model_not_found")
        return aliases[ref]

    async def _run(self, op: str, request: Request) -> tuple[dict, str]:
        """Run the request on the version it names; the result and `NAME/VERSION`, counted in the live signals."""
        with self.live.request() as seen:
            name, ref, payload = parse_request(op, await self._guard(request), self.cfg)
            aliases = self.served.get(name, {})
            ref = choose_alias(ref, self.cfg.canary_share, "challenger" in aliases
                               and aliases.get("challenger") != aliases.get("champion"))
            seen.key = key = served_key(name, self.rollouts.route(name, ref, self._version(name, ref)))
            response = self.model.options(multiplexed_model_id=key).run.remote(op, payload)
            try:
                result = await asyncio.wait_for(_awaited(response), self.cfg.request_timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise RequestProblem(504, f"the request took longer than {self.cfg.request_timeout_s:g} s "
                                          "(request_timeout_s); ask for fewer tokens or try again", "timeout") from None
            if "error" in result:
                raise RequestProblem(result["status"], result["error"], result.get("type", "invalid_request_error"))
            seen.result, seen.prompts = result, user_texts(payload)
            return result, key

    def _usage(self, result: dict) -> dict:
        p, c = result.get("prompt_tokens", 0), result.get("completion_tokens", 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # -- routes

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.cfg.model_name, "aliases": self.aliases, "mode": self.cfg.mode,
                **({"models": len(self.served)} if self.cfg.members else {}), **self.rollouts.status()}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        check_auth(request.headers.get("authorization"), self.token)
        data = [{"id": f"{name}@{a}", "object": "model", "version": v, "owned_by": "prefect-lora"}
                for name, aliases in self.served.items() for a, v in sorted(aliases.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> dict:
        result, version = await self._run("complete", request)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": version,
            "choices": [{"index": i, "text": t, "finish_reason": f, "logprobs": None}
                        for i, (t, f) in enumerate(zip(result["texts"], result["finish"]))],
            "usage": self._usage(result),
        }

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> dict:
        result, version = await self._run("chat", request)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": version,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["texts"][0]},
                         "finish_reason": result["finish"][0]}],
            "usage": self._usage(result),
        }

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> dict:
        result, version = await self._run("classify", request)
        return {"object": "classification", "model": version,
                "data": [{"index": i, "label": lab, "score": s}
                         for i, (lab, s) in enumerate(zip(result["labels"], result["scores"]))]}

    @app.get("/admin/stats")
    async def stats(self, request: Request) -> dict:
        """What one model replica holds: attached adapters, their memory, loads and evictions."""
        check_auth(request.headers.get("authorization"), self.token)
        if self.cfg.mode != "adapter":
            return {"mode": self.cfg.mode}
        return {"mode": self.cfg.mode, "replica": await self.model.stats.remote(),
                "max_adapters_per_replica": self.cfg.max_adapters_per_replica,
                "max_adapter_memory_mb": self.cfg.max_adapter_memory_mb}

    @app.get("/metrics")
    async def metrics(self, request: Request) -> PlainTextResponse:
        """Each served version's live signals in Prometheus' text format (auth as every route but /health)."""
        check_auth(request.headers.get("authorization"), self.token)
        return PlainTextResponse(self.live.metrics_text(), media_type=PROMETHEUS_TEXT)

    @app.post("/admin/refresh")
    async def notify(self, request: Request) -> dict:
        """Swap now (the promotion step calls this) instead of waiting for the next poll."""
        check_auth(request.headers.get("authorization"), self.token)
        return await self.refresh()


# ----------------------------------------------------------------------------- entry points


def build_app(cfg: ServeConfig, token: Secret | None = None, webhook: Secret | None = None):
    """The Serve application graph for `cfg` (not started); `webhook` hears of automatic rollbacks."""
    model_cls = AdapterModel if cfg.mode == "adapter" else MergedModel
    gpus = 1 if cfg.device.startswith("cuda") else 0
    model = model_cls.options(num_replicas=cfg.num_replicas,
                              ray_actor_options={"num_cpus": 1, "num_gpus": gpus}).bind(cfg.model_dump())
    return Gateway.bind(model, cfg.model_dump(), token, webhook)


def start(cfg: ServeConfig, *, ray_address: str | None = None, ray_temp_dir: str | None = None):
    """Start (or reuse) Ray and Serve and deploy the app; returns the gateway's handle."""
    import ray
    from prefect_lora.lora_tasks.registry import registry

    # A clear error before any actor starts: the default model fixes the replicas' base. A member
    # with no champion yet (or not registered yet) is followed and served once promoted.
    registry.resolve_version(cfg.tracking_uri, cfg.model_name, None)
    token = resolve_token(cfg)
    check_exposure(cfg, token)
    if not ray.is_initialized():
        # Serve gives a starting proxy 5 s to answer; on a busy host its imports took longer, Serve
        # killed it and `serve.start` failed. Read by the controller, which inherits this environment.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        kwargs = {"_temp_dir": ray_temp_dir} if ray_temp_dir else {}
        with _sigterm_kept():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, **kwargs)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(build_app(cfg, token, resolve_webhook()), name=cfg.app_name, route_prefix="/", blocking=False)
    logger.info("serving %s on http://%s:%s (auth %s)", ", ".join(cfg.served), cfg.host, cfg.port, "on" if token else "off")
    return handle


def stop(cfg: ServeConfig | None = None, *, shutdown_ray: bool = True) -> None:
    """Delete the app (or all of Serve) and, by default, shut Ray down: a local Ray's processes
    have ended when it returns (also those of a `ray.init` that a signal interrupted)."""
    import ray

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        if shutdown_ray:
            wait = {"wait_for_processes": True} if "wait_for_processes" in inspect.signature(ray.shutdown).parameters else {}
            ray.shutdown(**wait)


@contextlib.contextmanager
def _sigterm_kept():
    """The SIGTERM handler from before the block is the one after it, not ray.init's (a bare
    `sys.exit(15)`: the interpreter tore down around Ray's threads and aborted, exit 134, Serve
    and Ray's helpers left running). A SIGTERM that reaches Ray's handler meanwhile is passed on."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    kept = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM or not callable(kept):
            raise
        kept(signal.SIGTERM, None)
        raise
    finally:
        if kept is not None:
            signal.signal(signal.SIGTERM, kept)


def run_forever(cfg: ServeConfig, **kwargs) -> int | None:
    """`prefect-lora serve`: start, print where, serve until Ctrl-C or SIGTERM (what systemd and
    Kubernetes send), stop Serve and Ray; return the signal. A signal stops the start-up too, as a
    KeyboardInterrupt (the one exception Ray's waits pass on); one during the stop is only noted."""
    import signal

    stopped: list[int] = []
    stopping = threading.Event()

    def stop_on(signum, frame):
        stopped.append(signum)
        if len(stopped) == 1 and not stopping.is_set():
            raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, stop_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        start(cfg, **kwargs)  # keeps stop_on for SIGTERM across ray.init (`_sigterm_kept`)
        more = f" and {len(cfg.served) - 1} more model(s)" if cfg.members else ""
        print(f"serving {cfg.model_name}{more} ({cfg.mode}) on http://{cfg.host}:{cfg.port}  "
              f"[/health, /v1/models, /v1/completions, /v1/chat/completions, /v1/classify, /metrics, /admin/refresh]", flush=True)
        while True:  # until stop_on raises: it runs in this thread, which a signal caught by one of Ray's
            time.sleep(1)  # threads does not wake from a blocking wait
    except KeyboardInterrupt:
        if not stopped:  # not from stop_on: not a stop this function asked for
            raise
    finally:
        stopping.set()
        stop(cfg)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stopped[0]
