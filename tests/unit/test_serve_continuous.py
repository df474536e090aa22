"""Continuous batching in a replica: a request that arrives while a generation runs joins it at
its next forward pass, a row that ends leaves (its request answered at once), and every greedy
answer is the one the request gets alone, whatever adapters the other rows run. The replica's
inference code (`AdapterModel`'s, with its real `MicroBatcher`, `AdapterSet` and lock) on a tiny
PEFT model, with no Ray and no HTTP; the test steps in through a hook on the model's forward."""

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from prefect_lora.deploy.decoding import generate_rows
from prefect_lora.deploy.serve_core import split_rows

PROMPTS = ["What is 12 plus 30? Answer:", "Add 40 and 2.", "Sum of 7 and 8 is"]
HEAD = "You answer for the order desk of a small shop: be brief, and name the item and the quantity. "
"""A prompt head many requests share, as a system prompt or a chat template's is."""
WAIT_S = 60  # the most a hook waits for the test's next move: a failure, not a timing


@pytest.fixture(scope="module")
def replica(tmp_path_factory, tiny_model_dir):
    """`AdapterModel`'s inference methods on a hand-set replica of three random adapters, at
    most 4 rows a batch, no drafts (the tests count the tokens each pass reads; `drafts` sets them)."""
    from prefect_lora.deploy.adapters import AdapterSet
    from prefect_lora.deploy.decoding import ModelLock, decode_continuously, use_rows_attention
    from prefect_lora.deploy.serve import AdapterModel
    from prefect_lora.deploy.serve_core import MicroBatcher, ServeConfig
    from prefect_lora.deploy.testing import make_random_adapter
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer

    work = tmp_path_factory.mktemp("continuous")
    dirs = {f"m/{i}": make_random_adapter(tiny_model_dir, work / f"a{i}", 60 + i) for i in range(3)}
    r = object.__new__(AdapterModel.func_or_class)  # no Serve replica
    r.cfg, r.device, r.task = ServeConfig(model_name="m", batch_max_rows=4, draft_tokens=0), torch.device("cpu"), "causal_lm"
    r.tokenizer, r._lock = load_tokenizer(tiny_model_dir), ModelLock()
    base = load_base_model(tiny_model_dir, "causal_lm")
    r.joins_rows = use_rows_attention(base)
    r._files = {key: SimpleNamespace(model_config={"task": "causal_lm"}) for key in dirs}
    r.adapters = AdapterSet(base, "causal_lm",
                            lambda key: SimpleNamespace(adapter_dir=str(dirs[key])), max_count=2, max_bytes=None)
    r.adapters.ensure("m/0")  # (a replica attaches a request's adapter before it batches it)
    r._batcher = MicroBatcher(r._infer_batch, 4, 0.0, stream=lambda key, intake: decode_continuously(
        intake, r._prepare, r._routing, r._lock, r.tokenizer, r.device, r.cfg.draft_tokens))  # as `_setup` wires it
    return r


async def _ask(r, version: str, prompts: list[str], max_tokens: int, temperature: float = 0.0) -> dict:
    """What `run` does for a completion once its adapter is attached."""
    payload = {"prompts": prompts, "max_tokens": max_tokens, "temperature": temperature, "op": "complete"}
    return await r._batcher.submit(r._batch_key(version, "generate", None), (version, None, payload), len(prompts),
                                   streamed=True)


def _alone(r, version: str, prompt: str, max_tokens: int) -> dict:
    return asyncio.run(_ask(r, version, [prompt], max_tokens))


@pytest.fixture
def gate(replica):
    """`gate(when)`: the model's forward waits, the first time `when(passes)` holds (the rows of
    each pass so far, this one last), for the event `release`; `reached` is set when it starts
    waiting. Returns (reached, release)."""
    hooks = []

    def install(when):
        passes, reached, release = [], threading.Event(), threading.Event()

        def hook(module, args, kwargs):
            passes.append(len(kwargs["logits_to_keep"]))  # a packed pass keeps one logit per row
            if not reached.is_set() and when(passes):
                reached.set()
                assert release.wait(WAIT_S), "the test never released the model"
        hooks.append(replica.adapters.peft.register_forward_pre_hook(hook, with_kwargs=True))
        return reached, release

    yield install
    for h in hooks:
        h.remove()


def test_a_request_arriving_mid_generation_joins_the_running_batch_and_leaves_it_first(replica, gate):
    a_alone, b_alone = _alone(replica, "m/0", PROMPTS[0], 12), _alone(replica, "m/1", PROMPTS[1], 3)
    assert a_alone["finish"] == ["length"] and b_alone["texts"] != a_alone["texts"], "A runs 12 passes"
    assert a_alone == asyncio.run(asyncio.to_thread(_generated, replica, "m/0", PROMPTS[0], 12)), "as `generate` does"
    b = replica._batcher
    started, joins = b.started, len(b.joins)
    at_step, queued = gate(lambda passes: len(passes) == 2)  # A's second pass (the first read its prompt)
    b_left, b_seen = gate(lambda passes: passes[-1] == 1 and 2 in passes)  # A alone again: it waits for the test

    async def scenario():
        a = asyncio.ensure_future(_ask(replica, "m/0", [PROMPTS[0]], 12))
        assert await asyncio.to_thread(at_step.wait, WAIT_S)
        late = asyncio.ensure_future(_ask(replica, "m/1", [PROMPTS[1]], 3))
        await asyncio.sleep(0)  # `late` is queued
        queued.set()
        b_answer = await late
        a_running = not a.done()
        b_seen.set()
        return await a, b_answer, a_running

    a_answer, b_answer, a_running = asyncio.run(scenario())
    assert (a_answer, b_answer) == (a_alone, b_alone), "each answers as alone, B through its own adapter"
    assert a_running and b_left.is_set(), "B was answered while A still ran"
    assert b.started == started + 1, "B ran in A's batch, not in one of its own"
    assert list(b.joins)[joins:] == [(b.started, 2, 1)], "1 row joined after the second pass"


def test_a_joining_row_reads_the_prompt_head_it_shares_with_a_cached_one_from_the_cache(replica, gate):
    from prefect_lora.deploy.decoding import MIN_SHARED, prompt_texts

    (a, n_a), (b, n_b), (c, n_c) = asks = [(HEAD + PROMPTS[0], 12), (HEAD + PROMPTS[1], 3), (HEAD + PROMPTS[2], 3)]
    versions = ["m/0", "m/0", "m/1"]  # B shares A's weights, C runs another adapter
    alone = [_alone(replica, v, p, n) for v, (p, n) in zip(versions, asks)]
    ids = [prompt_texts(replica.tokenizer, {"task": "causal_lm"}, {"prompts": [p], "op": "complete"})[2][0] for p, _ in asks]
    shared = next(i for i, (x, y) in enumerate(zip(ids[0], ids[1])) if x != y)
    assert shared >= MIN_SHARED, "the head is long enough to share"
    read = []  # tokens each pass read
    counting = replica.adapters.peft.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["input_ids"].shape[-1]), with_kwargs=True)
    at_step, joined = gate(lambda passes: len(passes) == 2)  # A's second pass

    async def scenario():
        first = asyncio.ensure_future(_ask(replica, versions[0], [a], n_a))
        assert await asyncio.to_thread(at_step.wait, WAIT_S)
        late = [asyncio.ensure_future(_ask(replica, v, [p], n)) for v, p, n in ((versions[1], b, n_b), (versions[2], c, n_c))]
        await asyncio.sleep(0)  # both are queued
        joined.set()
        return await first, *[await x for x in late]

    try:
        answers = asyncio.run(scenario())
    finally:
        counting.remove()
    assert list(answers) == alone, "each answers as alone, B reading A's cached head"
    assert read[:3] == [len(ids[0]), 1, 1 + (len(ids[1]) - shared) + len(ids[2])], (
        "A's prompt; A's token; A's token, B's prompt past the shared head, C's whole prompt (other weights)")


def _generated(r, version: str, prompt: str, max_tokens: int) -> dict:
    """The answer of transformers' `generate` (what a replica without continuous batching gives)."""
    with r._lock:
        model, _ = r.adapters.activate([version])
        return split_rows(generate_rows(model, r.tokenizer, [prompt], True, [max_tokens], 0.0, "cpu"), [1])[0]


@pytest.fixture(params=[0, 4], ids=["no drafts", "drafts of 4"])
def drafts(request, replica):
    """The replica's `draft_tokens` for the test, its count of draft tokens read and kept before."""
    from prefect_lora.deploy.serve_core import ServeConfig

    replica.cfg = ServeConfig(model_name="m", batch_max_rows=4, draft_tokens=request.param)
    yield request.param, list(replica._batcher.drafts)
    replica.cfg = ServeConfig(model_name="m", batch_max_rows=4, draft_tokens=0)


@pytest.mark.parametrize("head", ["", HEAD], ids=["own prompts", "a shared head"])
def test_concurrent_greedy_answers_equal_their_answers_alone_across_adapters(replica, head, drafts):
    prompts = [head + p for p in PROMPTS]
    asks = [("m/0", prompts[:2], 8), ("m/1", prompts[2:], 5), ("m/2", prompts[1:2], 8), ("m/0", prompts[2:], 2),
            ("m/1", prompts[:1], 8), ("m/2", prompts[:1], 6), ("m/0", prompts[:1], 8)]  # (the last: the first's again)
    alone = [[_alone(replica, v, p, n) for p in prompts] for v, prompts, n in asks]

    async def together():
        sampled = _ask(replica, "m/2", prompts[:1], 8, temperature=0.8)  # a sampling row among them
        return await asyncio.gather(sampled, *(_ask(replica, v, p, n) for v, p, n in asks))

    b = replica._batcher
    passes = len(b.batches)
    sampled, *answers = asyncio.run(together())
    for got, solo in zip(answers, alone):
        assert got["texts"] == [s["texts"][0] for s in solo] and got["finish"] == [s["finish"][0] for s in solo]
        assert got["completion_tokens"] == sum(s["completion_tokens"] for s in solo)
    assert sampled["completion_tokens"] <= 8 and len(sampled["texts"]) == 1
    rows = list(b.batches)[passes:]
    assert max(rows) == 4 and len(b.joins) > 0, "4 rows at most; rows joined as others ended"
    read, kept = (now - before for now, before in zip(b.drafts, drafts[1]))
    if drafts[0]:  # the last request, which joins late, drafts the first one's answer to its prompt
        assert read > 0 and 0 < kept <= read, (read, kept)
    else:
        assert read == kept == 0


def test_an_adapter_load_goes_first_between_two_steps_and_the_batch_runs_on(replica, gate):
    a_alone = _alone(replica, "m/0", PROMPTS[2], 10)
    at_step, go = gate(lambda passes: len(passes) == 3)
    loaded, after_load = threading.Event(), []
    record = replica.adapters.peft.register_forward_pre_hook(lambda *_: after_load.append(loaded.is_set()))

    def load():  # what `AdapterModel._load_sync` does: here it attaches a third adapter (one must go)
        with replica._lock:
            replica.adapters.ensure("m/2")
            replica.adapters.ensure("m/1")
            loaded.set()

    async def scenario():
        a = asyncio.ensure_future(_ask(replica, "m/0", [PROMPTS[2]], 10))
        assert await asyncio.to_thread(at_step.wait, WAIT_S)
        loader = threading.Thread(target=load)
        loader.start()
        await asyncio.to_thread(_until, lambda: replica._lock.waiting == 1)
        go.set()
        answer = await a
        loader.join()
        return answer

    try:
        answer = asyncio.run(scenario())
    finally:
        record.remove()
    assert after_load[:3] == [False] * 3 and after_load[-1], "the load ran between two steps, not after the batch"
    assert answer == a_alone, "the batch readied its adapter again"


def _until(predicate) -> None:
    """Return once `predicate()` holds (a failure after `WAIT_S`)."""
    tick = threading.Event()
    for _ in range(WAIT_S * 100):
        if predicate():
            return
        tick.wait(0.01)
    raise AssertionError("the state the test waits for never came")


def test_drafts_keep_every_answer_as_it_was_in_fewer_passes(tiny_model_dir):
    """`RunningBatch` with drafts, on the tiny model whose greedy answers repeat themselves: the
    same tokens as without drafts, up to an odd `max_tokens` (a draft never runs past it), in
    fewer passes; rows that sample read no draft."""
    from prefect_lora.deploy.decoding import Row, RunningBatch, use_rows_attention
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer

    tokenizer, model = load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir, "causal_lm")
    assert use_rows_attention(model)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]

    def run(draft_tokens: int, temperature: float = 0.0) -> tuple[dict, int, int]:
        batch, answers, passes, kept = RunningBatch(tokenizer.eos_token_id, "cpu", draft_tokens), {}, 0, 0
        batch.admit([Row(i, 0, 23, temperature, list(p), weights="w") for i, p in enumerate(prompts)])
        while batch.rows:
            batch.step(model)
            passes, kept = passes + 1, kept + batch.drafts[1]
            answers.update({row.owner: row.tokens for row in batch.drop_ended()})
        return answers, passes, kept

    plain, plain_passes, _ = run(0)
    drafted, drafted_passes, kept = run(4)
    assert drafted == plain and all(len(a) == 23 for a in plain.values())
    assert kept > 0 and drafted_passes < plain_passes == 23, (kept, drafted_passes, plain_passes)
    assert run(4, temperature=0.7)[2] == 0
