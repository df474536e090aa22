import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.training.encoding import IGNORE_INDEX, collate, encode_examples
from prefect_lora.lora_tasks.training.loop import WorkerContext, iterate_batches, lr_lambda, plan_steps, train_worker

REPO = Path(__file__).resolve().parents[2]
ROWS = [json.loads(line) for line in (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()]


def make_cfg(task="causal_lm", **training):
    data = {"train_path": "x.jsonl"}
    if task == "causal_lm":
        data.update(prompt_column="prompt", completion_column="completion")
    else:
        data.update(labels=["neg", "pos"])
    return config_from_dict({
        "model_name": "t", "task": task, "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": data, "lora": {"r": 4, "dropout": 0.0},
        "training": {"max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "max_seq_length": 48, **training},
    })


def test_prompt_tokens_carry_no_loss_and_eos_is_learned(tiny_model_dir):
    from prefect_lora.lora_tasks.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ex = encode_examples([{"prompt": "1 + 2 =", "completion": " 3"}], tok, make_cfg())[0]
    n_prompt = len(tok("1 + 2 =")["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == tok(" 3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_long_prompt_is_cut_from_the_left(tiny_model_dir):
    from prefect_lora.lora_tasks.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    ex = encode_examples([{"prompt": "x" * 200 + "END", "completion": " ok"}], tok, make_cfg())[0]
    assert len(ex["input_ids"]) == 48
    assert tok.decode(ex["input_ids"]).endswith("END ok</s>")


def test_collate_left_pads_causal_batches_without_loss():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0, "causal_lm")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_completion_only_logits_give_the_full_loss(tiny_model_dir):
    """The left-padded, logits-only-where-needed loss equals HF's loss on the unpadded rows."""
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.training.encoding import causal_lm_loss

    tok = load_tokenizer(tiny_model_dir)
    model = load_base_model(tiny_model_dir, "causal_lm")
    examples = encode_examples(ROWS[:6], tok, make_cfg())
    loss_sum, n = causal_lm_loss(model, collate(examples, tok.pad_token_id, "causal_lm"))
    ref_sum, ref_n = 0.0, 0
    for ex in examples:  # one row at a time: no padding at all
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        k = int((labels[0, 1:] != IGNORE_INDEX).sum())
        ref_sum += float(model(input_ids=ids, labels=labels).loss) * k
        ref_n += k
    assert n == ref_n
    assert float(loss_sum) == pytest.approx(ref_sum, rel=1e-4)


@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 0, 0.25), ("cosine", 3, 1.0), ("cosine", 14, 0.0), ("cosine", 9, 0.5),
    ("linear", 9, 0.5), ("constant", 14, 1.0),
])
def test_lr_schedule(schedule, step, expected):
    assert lr_lambda(step, warmup=4, total=14, schedule=schedule) == pytest.approx(expected, abs=1e-9)


def test_shards_are_disjoint_equal_and_resumable():
    n, bs = 23, 4
    a = iterate_batches(n, bs, 0, 2, seed=1)
    b = iterate_batches(n, bs, 1, 2, seed=1)
    first = [next(a) for _ in range(3)]  # one epoch: 11 examples per rank -> 3 batches
    second = [next(b) for _ in range(3)]
    flat_a, flat_b = sum(first, []), sum(second, [])
    assert len(flat_a) == len(flat_b) == 11
    assert not set(flat_a) & set(flat_b)
    cont = [next(a) for _ in range(4)]
    resumed = iterate_batches(n, bs, 0, 2, seed=1, start=3)
    assert [next(resumed) for _ in range(4)] == cont


def test_plan_steps_from_epochs():
    cfg = make_cfg(max_steps=None, epochs=2, gradient_accumulation_steps=2)
    assert plan_steps(100, cfg, world_size=2) == (7, 7)  # 50 per worker / 8 -> 7 batches; 14 micro / 2
    with pytest.raises(ValueError, match="cannot be shared"):
        plan_steps(1, cfg, world_size=2)


def _run(cfg, rows, tmp_path, name, resume=None):
    reports, logs = [], []

    def report(metrics, folder):
        if folder:
            dest = tmp_path / f"{name}-{metrics['step']}"
            shutil.copytree(folder, dest)
            reports.append(dest)

    out = train_worker(cfg, rows, WorkerContext(report=report, log=lambda m, s: logs.append((s, m)), resume_from=resume))
    return out, reports, logs


def test_training_lowers_loss_and_checkpoints_adapter(tiny_model_dir, tmp_path):
    cfg = make_cfg(max_steps=30, checkpoint_every=10, warmup_steps=3)
    out, reports, logs = _run(cfg, ROWS, tmp_path, "a")
    assert out["step"] == 30
    assert [p.name for p in reports] == ["a-10", "a-20", "a-30"]
    assert (reports[-1] / "adapter" / "adapter_model.safetensors").exists()
    assert (reports[-1] / "adapter" / "adapter_config.json").exists()
    assert [s for s, _ in logs] == list(range(1, 31))
    first, last = logs[0][1]["train_loss"], logs[-1][1]["train_loss"]
    assert last < first - 0.3, (first, last)
    assert logs[1][1]["learning_rate"] > logs[0][1]["learning_rate"]  # warmup


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_from_checkpoint_is_exact(tiny_model_dir, tmp_path, packing):
    from safetensors.torch import load_file

    cfg = make_cfg(max_steps=8, checkpoint_every=4, packing=packing)
    _, straight, straight_logs = _run(cfg, ROWS, tmp_path, "s")
    out, resumed, resumed_logs = _run(cfg, ROWS, tmp_path, "r", resume=straight[0])
    assert out["step"] == 8
    assert [s for s, _ in resumed_logs] == [5, 6, 7, 8]  # no step trained twice
    assert [m["train_loss"] for _, m in resumed_logs] == pytest.approx([m["train_loss"] for _, m in straight_logs[4:]], rel=1e-5)
    a = load_file(straight[-1] / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed[-1] / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_classification_trains_head_and_adapter(tiny_model_dir, tmp_path):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} thing {i}", "label": "pos" if i % 2 else "neg"} for i in range(64)]
    out, reports, logs = _run(make_cfg("sequence_classification", max_steps=20), rows, tmp_path, "c")
    assert out["step"] == 20 and reports
    assert logs[-1][1]["train_loss"] < logs[0][1]["train_loss"]


def _losses(cfg) -> list[float]:
    seen = []
    train_worker(cfg, ROWS[:64], WorkerContext(log=lambda m, step: seen.append(m["train_loss"])))
    return seen


def test_gradient_checkpointing_trains_the_same_steps(tiny_model_dir):
    """Recomputing activations changes memory, not the maths: the same losses step by step."""
    plain, checkpointed = _losses(make_cfg()), _losses(make_cfg(gradient_checkpointing=True))
    assert len(plain) == 6
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_eager_attention_trains_the_same_steps_as_sdpa(tiny_model_dir):
    """The attention kernel changes speed, not the maths (fp32: same losses to rounding)."""
    sdpa, eager = (_losses(make_cfg(attention=a, precision="fp32")) for a in ("sdpa", "eager"))  # auto: bf16 on some CPUs
    assert len(sdpa) == 6
    assert eager == pytest.approx(sdpa, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("device, precision, longest, task, expected", [
    ("cpu", "bf16", 120, "causal_lm", "eager"),   # where torch's CPU flash kernel is slow
    ("cpu", "bf16", 192, "causal_lm", "eager"),
    ("cpu", "bf16", 193, "causal_lm", "sdpa"),    # longer: eager is no faster and holds T^2 scores
    ("cpu", "fp32", 120, "causal_lm", "sdpa"),    # fp32: no difference measured
    ("cuda", "bf16", 120, "causal_lm", "sdpa"),   # GPU: flash kernels
    ("cpu", "bf16", 120, "sequence_classification", "sdpa"),  # not measured: left as it was
])
def test_auto_attention_is_eager_only_for_short_bf16_causal_lm_on_cpu(device, precision, longest, task, expected):
    from prefect_lora.lora_tasks.training.compute import Compute
    from prefect_lora.lora_tasks.training.loop import attention_kernel

    compute = Compute(torch.device(device), precision, precision)
    assert attention_kernel(make_cfg(task, precision=precision), compute, longest) == expected
    assert attention_kernel(make_cfg(task, precision=precision, attention="sdpa"), compute, longest) == "sdpa"


def test_gpu_only_options_are_refused_on_a_cpu_config():
    from prefect_lora.lora_tasks.errors import ConfigError

    raw = make_cfg().model_dump()
    raw["base_model"]["quantization"] = "4bit"
    with pytest.raises(ConfigError, match="scaling.use_gpu"):
        config_from_dict(raw)


def test_plain_text_causal_lm_loss_equals_hf_loss(tiny_model_dir):
    """Without a prompt every token but the first is a target (the first has nothing before it)."""
    from prefect_lora.lora_tasks.modeling import load_base_model
    from prefect_lora.lora_tasks.training.encoding import causal_lm_loss

    model = load_base_model(tiny_model_dir, "causal_lm")
    ids = torch.randint(3, 200, (2, 12))
    batch = collate([{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], 0, "causal_lm")
    total, n = causal_lm_loss(model, batch)
    assert n == 2 * 11
    assert float(total) / n == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-5)


def test_auto_precision_is_bf16_only_where_the_device_runs_it_fast(monkeypatch):
    from prefect_lora.lora_tasks.training.compute import compute_for, resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for capability, avx512_bf16, amx, expected in [("AVX512", True, False, "bf16"), ("AVX512", False, True, "bf16"),
                                                   ("AVX512", False, False, "fp32"), ("AVX2", True, True, "fp32")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda v=capability: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", "cpu") == expected
        resolved = compute_for.__wrapped__("auto", "cpu")  # not the process's cached one: the CPU is patched
        assert resolved.precision == expected and (type(resolved.autocast()).__name__ == "autocast") == (expected == "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cuda") == "fp32"


def test_explicit_bf16_on_a_cpu_without_bf16_warns_with_the_measured_slowdown(monkeypatch):
    from prefect_lora.lora_tasks.training import compute

    monkeypatch.setattr(compute, "cpu_runs_bf16", lambda: False)
    warning = compute.slow_bf16_warning("bf16", "cpu")
    slower = float(re.search(r"ran (\d+)x slower", warning).group(1))
    assert slower >= 0 and "training.precision: auto" in warning
    assert compute.slow_bf16_warning("auto", "cpu") is None and compute.slow_bf16_warning("fp32", "cpu") is None
    monkeypatch.setattr(compute, "cpu_runs_bf16", lambda: True)
    assert compute.slow_bf16_warning("bf16", "cpu") is None


def test_a_progress_line_gives_step_loss_rate_and_time_left():
    from prefect_lora.lora_tasks.training.loop import progress_line

    line = progress_line(step=8, total=48, done=8, loss=0.41234, elapsed=36.8, tokens=45_402)
    assert line == "training step 8/48 (17%): loss 0.412, 1,230 tokens/s, 4.6 s/step, about 3 min 4 s left"
    assert progress_line(48, 48, 40, 0.1, 10.0, 100).endswith("about 0 s left")


def test_slow_loops_say_where_they_are_at_least_every_few_seconds(tiny_model_dir, monkeypatch, caplog, capsys):
    """However slow each step or batch, a line comes every PROGRESS_EVERY_S seconds (0 here: every one)."""
    import logging

    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.training import encoding
    from prefect_lora.lora_tasks.training import loop as training

    monkeypatch.setattr(encoding, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)
    tok = load_tokenizer(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="prefect_lora.lora_tasks.training.encoding"):
        encoding.generate_answers(load_base_model(tiny_model_dir, "causal_lm"), tok, [f"{i} + 1 =" for i in range(5)], 2, 2,
                                  label="probe answers")
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["probe answers: 2/5 answers", "probe answers: 4/5 answers"]
    train_worker(make_cfg(max_steps=5, log_every=5), ROWS[:40], WorkerContext())
    steps = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("training step")]
    assert steps == ["1/5", "2/5", "3/5", "4/5", "5/5"]


def test_generation_batches_hold_as_many_prompts_as_fit_their_token_budget(tiny_model_dir):
    """With `batch_tokens`, a batch takes prompts (shortest first) while rows x (its longest prompt
    + new tokens) fits, at least one even when a single prompt does not; the answers are those of
    fixed-size batches, in the prompts' order."""
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.training import encoding

    lengths = [5, 30, 10, 10, 50, 20]
    order = sorted(range(6), key=lambda i: lengths[i])
    assert list(encoding._generation_batches(order, lengths, 10, 2, None)) == [[0, 2], [3, 5], [1, 4]]
    assert list(encoding._generation_batches(order, lengths, 10, 2, 80)) == [[0, 2, 3], [5, 1], [4]]
    assert list(encoding._generation_batches(order, lengths, 10, 2, 10)) == [[0], [2], [3], [5], [1], [4]]
    tok, model = load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir, "causal_lm")
    torch.manual_seed(0)
    for p in model.parameters():  # weights that answer each prompt differently
        p.data.normal_(0, 0.3)
    prompts = [f"{'9' * (i % 7)}{i} + 1 =" for i in range(12)]
    fixed = encoding.generate_answers(model, tok, prompts, 3, 2)
    assert encoding.generate_answers(model, tok, prompts, 3, 2, batch_tokens=64) == fixed
    assert len(set(fixed)) > 1, "the prompts get different answers: order is checked"


def test_a_planted_trainer_state_is_refused_not_run(tmp_path):
    """A trainer_state.pt that holds more than tensors and plain values (a pickle that would run
    code) is refused with what to do; the trainer's own state loads."""
    import pickle

    from prefect_lora.lora_tasks.errors import TrainingError
    from prefect_lora.lora_tasks.training.loop import read_trainer_state

    ok = tmp_path / "ok.pt"
    torch.save({"step": 3, "torch_rng": [torch.get_rng_state()], "scheduler": {"last_epoch": 3}}, ok)
    assert read_trainer_state(ok)["step"] == 3
    planted = tmp_path / "trainer_state.pt"
    torch.save({"step": 3, "payload": pickle.PicklingError("stands for any object")}, planted)
    with pytest.raises(TrainingError, match="not written by this trainer. Remove that checkpoint folder"):
        read_trainer_state(planted)


def test_a_diverging_loss_is_a_training_error_that_is_not_retried(tiny_model_dir):
    from prefect.states import Completed, Failed
    from prefect_lora.flows.retrain import _worth_retrying
    from prefect_lora.lora_tasks.errors import ConfigError, NonFiniteLoss, TrainingError

    with pytest.raises(NonFiniteLoss, match=r"training loss became (nan|inf) at step \d; lower training.learning_rate"):
        train_worker(make_cfg(learning_rate=1e30, max_grad_norm=None, max_steps=3), ROWS[:32], WorkerContext())
    failed = lambda exc: Failed(data=exc)
    assert not _worth_retrying(None, None, failed(NonFiniteLoss("training loss became nan")))
    assert not _worth_retrying(None, None, failed(ConfigError(["x: bad"])))
    assert _worth_retrying(None, None, failed(TrainingError("training failed on Ray: a worker died")))
    assert _worth_retrying(None, None, Completed())


def _ranks_after_broadcast(rank: int, store_path: str, out: dict) -> None:
    import torch.distributed as dist
    from prefect_lora.lora_tasks.training import loop as training

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    torch.manual_seed(rank)  # each rank starts from its own values
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    training._broadcast_trainable(model)
    out[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def test_the_weights_that_train_start_as_rank_zeros_and_the_frozen_base_is_not_sent(tmp_path):
    """DDP is built without its initial broadcast of every weight (each rank loaded the same base
    files); the trainable weights alone are made rank 0's, in one broadcast."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ranks_after_broadcast, args=(str(tmp_path / "store"), out), nprocs=2, start_method="fork")
        zero, one = out[0], out[1]
    for name in ("1.weight", "1.bias"):
        torch.testing.assert_close(one[name], zero[name], rtol=0, atol=0)
    torch.manual_seed(1)
    assert torch.equal(one["0.weight"], torch.nn.Linear(3, 3).weight), "a frozen weight keeps the rank's own value"
    assert not torch.equal(one["0.weight"], zero["0.weight"])
