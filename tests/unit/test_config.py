from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prefect_lora.lora_tasks.config import PipelineConfig, apply_overrides, config_from_dict, load_config
from prefect_lora.lora_tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

MINIMAL = {
    "model_name": "m",
    "task": "causal_lm",
    "base_model": {"name_or_path": "builtin:tiny-llama"},
    "data": {"train_path": "x.jsonl"},
    "training": {"max_steps": 5},
}


def test_every_shipped_config_loads():
    assert CONFIGS, "configs/ holds at least one scenario"
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, PipelineConfig), path


def test_minimal_config_gets_defaults_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(MINIMAL)
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.data.train_path == str(tmp_path / "x.jsonl")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path}/.prefect-lora/mlflow.db"
    assert cfg.experiment_name == "m"


def test_all_problems_reported_at_once_with_key_paths():
    raw = {
        "model_name": "bad name!",
        "task": "translation",
        "base_model": {"name_or_path": "x", "colour": "red"},
        "data": {"train_path": "x", "eval_fraction": 1.5},
        "lora": {"r": 0},
        "training": {"max_steps": 5, "learning_rate": -1},
        "extra_section": {},
    }
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="bad.yaml")
    text = str(err.value)
    for path in ("model_name", "task", "base_model.colour", "data.eval_fraction", "lora.r",
                 "training.learning_rate", "extra_section"):
        assert path in text, (path, text)
    assert "unknown key" in text
    assert len(err.value.problems) == 7


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"training": {}}, "set training.max_steps or training.epochs"),
        ({"training": {"max_steps": 5, "warmup_steps": 5}}, "warmup_steps (5) must be below max_steps (5)"),
        ({"task": "sequence_classification"}, "needs data.labels"),
        ({"data": {"train_path": "x", "prompt_column": "p"}}, "prompt_column and completion_column go together"),
        ({"data": {"train_path": "x", "validation": {"min_chars": 10, "max_chars": 5}}}, "min_chars (10) is larger"),
        ({"task": "sequence_classification", "data": {"train_path": "x", "labels": [1, "1"]}}, "duplicates"),
    ],
)
def test_cross_field_checks(patch, message):
    with pytest.raises(ConfigError, match=None) as err:
        config_from_dict({**MINIMAL, **patch})
    assert message in str(err.value)


def test_every_cross_field_problem_is_reported_at_once_with_its_key_path():
    raw = {**MINIMAL,
           "base_model": {"name_or_path": "builtin:tiny-llama", "quantization": "4bit"},  # needs scaling.use_gpu
           "data": {"train_path": "x", "prompt_column": "p"},                          # needs completion_column
           "training": {"max_steps": 5, "warmup_steps": 5, "packing": True}}           # warmup too long
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.problems == [
        "data: prompt_column and completion_column go together: set both or neither",
        "training: warmup_steps (5) must be below max_steps (5)",
        "base_model.quantization: 4bit runs on CUDA GPUs only: set scaling.use_gpu: true, or drop it",
    ]


def test_cross_field_problems_come_with_field_errors_of_other_sections():
    raw = {**MINIMAL, "data": {"train_path": "x", "prompt_column": "p"}, "lora": {"r": 0}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    text = str(err.value)
    assert "lora.r" in text and "prompt_column and completion_column go together" in text
    assert len(err.value.problems) == 2


def test_overrides_apply_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["training.max_steps=9", "lora.target_modules=[q_proj, v_proj]",
                             "scaling.use_gpu=true", "promotion.max_kl=null"])
    assert cfg.training.max_steps == 9
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.scaling.use_gpu is True
    assert cfg.promotion.max_kl is None


@pytest.mark.parametrize("override, message", [
    ("training.max_steps", "expected key.path=value"),
    ("=3", "expected key.path=value"),
    ("model_name.x=1", "model_name is not a section"),
    ("training.nope=1", "training.nope: unknown key"),
])
def test_bad_overrides_are_named(override, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b"model_name: [unclosed", "not valid YAML at line 1"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"- a\n- b\n", "top level must be a mapping"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_tracks_content():
    a, b = config_from_dict(MINIMAL), config_from_dict(MINIMAL)
    c = config_from_dict(apply_overrides(MINIMAL, ["training.max_steps=6"]))
    assert a.config_hash() == b.config_hash() != c.config_hash()


def _leaves(d: dict, prefix: str = "") -> list[str]:
    return [k for key, v in d.items() for k in (_leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]


LEAVES = _leaves(config_from_dict(MINIMAL).model_dump(mode="json"))
ODD_VALUES = st.one_of(st.dates(), st.datetimes(), st.binary(max_size=4), st.sets(st.integers(), max_size=2),
                       st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**40), 10**40),
                       st.text(max_size=8), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(LEAVES), value=ODD_VALUES)
@example(key="replay.path", value="\x00")  # found by this test: a path with NUL broke resolving paths
@example(key="training.learning_rate", value=float("inf"))
def test_any_value_at_any_key_is_a_config_or_a_one_line_error(key, value):
    """What YAML can produce (dates, binary, sets, inf, nan, huge ints) never escapes as anything
    but a ConfigError naming the key; an accepted config hashes and has no inf or nan."""
    import copy
    import math

    raw = copy.deepcopy(MINIMAL)
    node = raw
    *sections, leaf = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and "\n" not in p for p in exc.problems)
        return
    assert len(cfg.config_hash()) >= 12
    dumped = _leaves(cfg.model_dump(mode="json"))
    assert dumped == LEAVES
    assert not [v for v in _values(cfg.model_dump()) if isinstance(v, float) and not math.isfinite(v)]


def _values(d):
    for v in d.values():
        yield from (_values(v) if isinstance(v, dict) else [v])


def test_settings_added_for_classifiers_leave_a_causal_lm_config_hash_as_it_was():
    """A scheduled causal-LM pipeline must still skip its unchanged rerun after an upgrade: the
    hashed dict is the one hashed before (`max_representation_drift` at its old default, none of
    the settings added since)."""
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.config_io import without_defaults_added_later

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    hashed = without_defaults_added_later(cfg.model_dump(mode="json"))
    assert hashed["promotion"]["max_representation_drift"] == 0.2 and "max_retrieval_loss" not in hashed["promotion"]
    assert "baseline_rows" not in hashed["evaluation"] and "check_conflicts" not in hashed["data"]["validation"]
    cls = load_config(REPO / "configs" / "sst2.yaml")
    assert "max_representation_drift" not in without_defaults_added_later(cls.model_dump(mode="json"))["promotion"]
