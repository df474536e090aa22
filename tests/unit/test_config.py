from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prefect_lora.lora_tasks.config import PipelineConfig, apply_overrides, config_from_dict, load_config
from prefect_lora.lora_tasks.config_io import MAX_VALUES, load_yaml
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
    ("training.nope=1", "training.nope: unknown key (check its spelling and section)"),
    # an unknown key names the key meant: the nearest of its section (difflib), else another section's
    ("training.learnig_rate=1e-4", "training.learnig_rate: unknown key: did you mean `learning_rate`?"),
    ("evaluation.reference.max_tokenz=8", "evaluation.reference.max_tokenz: unknown key: did you mean `max_tokens`?"),
    ("trainng.max_steps=3", "trainng: unknown key: did you mean `training`?"),
    ("training.num_workers=2", "training.num_workers: unknown key here: did you mean `scaling.num_workers`?"),
])
def test_bad_overrides_are_named(override, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value)


def test_an_unknown_key_in_the_file_names_the_key_meant(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "training": {"max_steps": 5, "learnig_rate": 1e-4}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["training.learnig_rate: unknown key: did you mean `learning_rate`?"]


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


def _values(d):
    for v in d.values():
        yield from (_values(v) if isinstance(v, dict) else [v])


LEAVES = _leaves(config_from_dict(MINIMAL).model_dump(mode="json"))
HUGE_NUMBERS = st.sampled_from([10**5000, -(10**5000), 2**63, -(2**64), 10**40, float("1e400"), float("-1e400"), 1e308])
LONG_STRINGS = st.integers(100, 5000).flatmap(lambda n: st.sampled_from(["a" * n, "/" + "b" * n, "c/" * (n // 2), "~" + "d" * n]))
ODD_VALUES = st.one_of(st.dates(), st.datetimes(), st.binary(max_size=4), st.sets(st.integers(), max_size=2),
                       st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**40), 10**40),
                       st.text(max_size=8), st.none(), st.booleans(), st.lists(st.integers(), max_size=2),
                       HUGE_NUMBERS, LONG_STRINGS, st.lists(st.booleans(), min_size=1, max_size=2),
                       st.sampled_from(["\ud800", "a\udfffb", "~" + "u" * 300 + "/x"]))


def _with(raw: dict, key: str, value) -> dict:
    import copy

    raw = copy.deepcopy(raw)
    node = raw
    *sections, leaf = key.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value
    return raw


def _names_the_key(exc: ConfigError, key: str) -> None:
    """Every problem is one line; one of them names the key, or its section where the value broke
    a rule between keys (`replay.share` set, `replay.source` then needs a prompt column)."""
    assert exc.problems and all(isinstance(p, str) and "\n" not in p for p in exc.problems)
    leaf, section = key.rsplit(".", 1)[-1], key.split(".")[0]
    assert any(key in p or leaf in p or p.startswith(section) for p in exc.problems), (key, exc.problems)


def _sound(cfg: PipelineConfig) -> None:
    """An accepted config hashes, has every key, and holds no inf, nan, or boolean where a number goes."""
    import math

    assert len(cfg.config_hash()) >= 12
    assert _leaves(cfg.model_dump(mode="json")) == LEAVES
    assert not [v for v in _values(cfg.model_dump()) if isinstance(v, float) and not math.isfinite(v)]
    defaults = dict(zip(LEAVES, _values(config_from_dict(MINIMAL).model_dump()), strict=True))
    for key, v in zip(LEAVES, _values(cfg.model_dump()), strict=True):
        number = isinstance(defaults[key], (int, float)) and not isinstance(defaults[key], bool)
        assert not (number and isinstance(v, bool)), (key, v)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(LEAVES), value=ODD_VALUES)
@example(key="replay.path", value="\x00")  # found by this test: a path with NUL broke resolving paths
@example(key="training.learning_rate", value=float("inf"))
@example(key="base_model.name_or_path", value="e" * 300)  # found by this test: OSError, file name too long
@example(key="training.max_steps", value=10**5000)  # no str() of it: int() refuses 4,300 digits
def test_any_value_at_any_key_is_a_config_or_a_one_line_error(key, value):
    """What YAML can produce (dates, binary, sets, inf, nan, huge ints, long text) never escapes as
    anything but a ConfigError naming the key; an accepted config hashes and has no inf or nan."""
    try:
        cfg = config_from_dict(_with(MINIMAL, key, value))
    except ConfigError as exc:
        _names_the_key(exc, key)
        return
    _sound(cfg)


def _alias_nest(depth: int, width: int, leaf: str) -> tuple[str, int]:
    """YAML flow text of `depth` lists, each holding an anchor and `width - 1` aliases of it (the
    billion laughs at 9 x 9), and how many leaves it expands to."""
    text = leaf
    for i in range(depth):
        text = f"[&a{i} {text}" + f", *a{i}" * (width - 1) + "]"
    return text, width**depth


YAML_TEXTS = st.one_of(
    st.builds(_alias_nest, st.integers(1, 9), st.integers(1, 9), st.sampled_from(["x", "1", "true", "null", "{a: 1}"])),
    st.builds(lambda text: (text, 1), st.sampled_from(["1e400", "-1e400", ".inf", ".nan", "0x" + "f" * 5000, "9" * 20,
                                                       "&s {k: *s}", "&s [*s]", "yes", "[yes, no]", '"\\ud800"'])),
    st.integers(4301, 6000).map(lambda n: ("9" * n, 1)),  # more digits than int() converts
    st.integers(100, 5000).map(lambda n: ("'" + "s" * n + "'", 1)),
    st.integers(20, 90).map(lambda d: ("[" * d + "]" * d, 1)),
)


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(LEAVES), text_and_size=YAML_TEXTS)
@example(key="training.seed", text_and_size=_alias_nest(9, 9, '"lol"'))  # the billion laughs, 387 million leaves
@example(key="data.labels", text_and_size=_alias_nest(9, 9, "x"))  # a list field: pydantic would walk it all
def test_any_yaml_at_any_key_is_a_config_or_an_error_naming_the_key(key, text_and_size):
    """YAML's own ways to be large (aliases of aliases, a recursive alias, numbers beyond int()'s
    4,300 digits or float's range, deep nesting, long text) at every key: a config or a ConfigError
    naming the key. Never a hang: the expansion is bounded by construction (MAX_VALUES), so a text
    that expands beyond it is refused as such."""
    text, size = text_and_size
    doc = yaml.safe_dump(_with(MINIMAL, key, "__VALUE__")).replace("__VALUE__", text)
    try:
        cfg = config_from_dict(load_yaml(doc))
    except ConfigError as exc:
        _names_the_key(exc, key)
        assert size <= MAX_VALUES or "expands to more than" in str(exc), exc.problems
        return
    assert size <= MAX_VALUES
    _sound(cfg)


@pytest.mark.parametrize("text, message", [
    ("[" * 150 + "]" * 150, "nested more than 100 levels deep"),  # PyYAML itself would raise RecursionError
    ("&a [*a]", "nested more than 32 levels deep"),
])
def test_nesting_beyond_reason_is_a_config_error_not_a_recursion_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with(MINIMAL, "data.labels", "__VALUE__")).replace("__VALUE__", text))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("raw, message", [
    (_with(MINIMAL, "data.train_path", "x\udc00.jsonl"), "data.train_path: contains a lone surrogate ('\\udc00')"),
    ({**MINIMAL, "\ud800": 1}, "\\ud800: the key contains a lone surrogate"),
])
def test_a_lone_surrogate_in_a_key_or_value_is_named_and_printable(raw, message):
    """YAML's "\\ud800" is a str no file name or terminal takes: named, and shown escaped."""
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)
    str(err.value).encode("utf-8")  # a terminal can print it


def test_a_file_larger_than_any_config_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "# " + "x" * 300_000 + "\n")
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(path)


@pytest.mark.parametrize("key", [k for k, v in zip(LEAVES, _values(config_from_dict(MINIMAL).model_dump()), strict=True)
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)])
def test_a_boolean_is_no_number(key):
    """Found by hand: `batch_size: true` was read as 1 (pydantic's lax bool -> int)."""
    with pytest.raises(ConfigError) as err:
        config_from_dict(_with(MINIMAL, key, True))
    assert any(p.startswith(f"{key}: True is a boolean") for p in err.value.problems), err.value.problems


def test_unquoted_yes_no_labels_are_refused_not_read_as_1_and_0():
    raw = _with(_with(MINIMAL, "task", "sequence_classification"), "data.labels", [True, False])
    with pytest.raises(ConfigError, match="data.labels: .* holds a boolean .* quote the text"):
        config_from_dict(raw)


@pytest.mark.parametrize("key, value, message", [
    ("training.seed", -1, "training.seed: Input should be greater than or equal to 0"),  # numpy refused it mid-run
    ("training.seed", 2**32, "training.seed: Input should be less than or equal to 4294967295"),
    ("model_name", "m" * 101, "model_name: String should have at most 100 characters"),  # OSError: name too long
    ("tracking.experiment", "e" * 251, "tracking.experiment: String should have at most 250 characters"),
    ("training.batch_size", 1e300, "training.batch_size: Unable to parse input string as an integer, exceeded maximum"),
    ("training.max_steps", 2**63, "training.max_steps: the number is out of range"),
    ("base_model.name_or_path", "h" * 300, "(300 characters)' is no local folder and no Hugging Face hub id"),  # failed at load
    ("base_model.name_or_path", "org/two words", "'org/two words' is no local folder and no Hugging Face hub id"),
])
def test_values_the_run_cannot_use_are_refused_when_the_config_is_read(key, value, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(_with(MINIMAL, key, value))
    assert message in str(err.value) and len(str(err.value)) < 400


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


def test_required_fields_need_json_answers_and_leave_the_hash_of_configs_without_them():
    """`evaluation.generation.required_fields` (the live output checks' JSON contract) came after
    configs were first hashed: a config without it keeps its hash."""
    from prefect_lora.lora_tasks.config_io import without_defaults_added_later

    raw = {**MINIMAL, "data": {"train_path": "x.jsonl", "prompt_column": "p", "completion_column": "c"}}
    with pytest.raises(ConfigError, match=r"evaluation.generation.required_fields: needs metric: json"):
        config_from_dict(_with(raw, "evaluation.generation", {"metric": "exact", "required_fields": ["a"]}))
    plain = config_from_dict(_with(raw, "evaluation.generation", {"metric": "json"}))
    assert "required_fields" not in without_defaults_added_later(plain.model_dump(mode="json"))["evaluation"]["generation"]
    fields = config_from_dict(_with(raw, "evaluation.generation", {"metric": "json", "required_fields": ["a"]}))
    assert fields.config_hash() != plain.config_hash() and fields.training_hash() == plain.training_hash()
