import json

import pytest
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.data.demo import FIELDS, generate_rows, write_demo_data
from prefect_lora.lora_tasks.measurement.evaluation import generation_metrics, score_json


def test_generator_is_deterministic_distinct_and_valid_json():
    a, b = generate_rows(500, seed=3), generate_rows(500, seed=3)
    assert a == b
    assert a != generate_rows(500, seed=4)
    assert len({r["prompt"] for r in a}) == 500
    targets = [json.loads(r["completion"]) for r in a]
    assert all(tuple(t) == FIELDS for t in targets)
    assert {t["intent"] for t in targets} == {"order", "cancel", "return", "track", "question"}
    assert {t["urgency"] for t in targets} == {"low", "normal", "high"}
    assert all(isinstance(t["quantity"], int) and t["quantity"] >= 1 for t in targets)


def test_demo_files_have_disjoint_splits(tmp_path):
    train, eval_ = write_demo_data(tmp_path, n_train=300, n_eval=100, seed=1)
    tr = [json.loads(line) for line in train.read_text().splitlines()]
    ev = [json.loads(line) for line in eval_.read_text().splitlines()]
    assert len(tr) == 300 and len(ev) == 100
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in ev}


@pytest.mark.parametrize("prediction, exact, fields, valid", [
    ('{"intent": "order", "product": "webcam", "quantity": 2, "urgency": "low"}', True, 1.0, True),
    ('  {"urgency": "low", "quantity": 2, "product": "webcam", "intent": "order"}\n', True, 1.0, True),
    ('{"intent": "order", "product": "webcam", "quantity": "2", "urgency": "low"}', False, 0.75, True),
    ('{"intent": "order", "product": "webcam", "quantity": 2, "urgency": "low", "x": 1}', False, 1.0, True),
    ('Sure! Here is the JSON: {"intent": "order"}', False, 0.0, False),
    ('[1, 2]', False, 0.0, False),
])
def test_json_scoring(prediction, exact, fields, valid):
    target = '{"intent": "order", "product": "webcam", "quantity": 2, "urgency": "low"}'
    assert score_json(prediction, target) == (exact, pytest.approx(fields), valid)


def test_generation_metrics_average_over_rows():
    t = '{"a": 1, "b": 2}'
    m = generation_metrics(['{"a": 1, "b": 2}', '{"a": 1, "b": 3}', "nope", '{"a": 1, "b": 2}'], [t] * 4, "json")
    assert m == {"exact_match": 0.5, "field_accuracy": pytest.approx(0.625), "valid_json": 0.75}
    assert generation_metrics([" yes ", "no"], ["yes", "yes"], "exact") == {"exact_match": 0.5}


def test_demo_config_uses_offline_model_and_probes():
    cfg = load_config("configs/demo.yaml")
    assert cfg.base_model.name_or_path == "builtin:smollm2-135m-instruct"
    assert cfg.evaluation.reference.probes == "general"
    assert cfg.evaluation.generation.metric == "json"
    assert cfg.scaling.num_workers == 2


def test_the_demo_keeps_the_default_forgetting_policy_and_remedies_a_refusal():
    from prefect_lora.lora_tasks.config import PromotionPolicy

    cfg, default = load_config("configs/demo.yaml"), PromotionPolicy()
    for limit in ("max_perplexity_ratio", "max_self_retention_ratio", "max_kl", "confidence"):
        assert getattr(cfg.promotion, limit) == getattr(default, limit), limit
    assert cfg.remedy.strategy != "none" and cfg.remedy.when == "refused"
