"""JobConfig: defaults, TOML files, dotted overrides, types, errors and the TOML round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fp8lab.config import (
    SECTIONS,
    JobConfig,
    config_from_dict,
    describe_fields,
    load_config,
    parse_overrides,
)
from fp8lab.errors import FP8LabError
from fp8lab.precision.recipes import RECIPES
from helpers import REPO


def write(tmp_path, text: str, name: str = "job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def raises_one_line(match: str):
    """pytest.raises(FP8LabError) whose message must also be a single line."""
    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(FP8LabError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            if handled:
                assert "\n" not in str(self.info.value), f"multi-line error: {self.info.value}"
            return handled

    return _Ctx()


# -- defaults -----------------------------------------------------------------------------


def test_defaults_are_valid_and_match_load_config_without_input():
    cfg = JobConfig()
    assert load_config() == cfg
    assert load_config(None, {}) == cfg
    assert cfg.precision.recipe == "bf16" and cfg.data.path == "embedded"
    assert cfg.model.dim is None and cfg.precision.skip_modules == ["output"]
    assert cfg.optim.warmup_steps <= cfg.train.steps
    flat = cfg.flat()
    assert set(flat) == {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def test_default_lists_are_not_shared_between_instances():
    a, b = JobConfig(), JobConfig()
    a.precision.skip_modules.append("w2")
    assert b.precision.skip_modules == ["output"]


def test_shipped_demo_config_loads():
    cfg = load_config(REPO / "configs" / "demo.toml")
    assert cfg.data.seq_len == 256 and cfg.train.steps == 150 and cfg.optim.lr == 2e-3
    assert cfg.checkpoint.keep == 2 and cfg.logging.log_interval == 25


# -- TOML and precedence ------------------------------------------------------------------


def test_toml_values_override_defaults(tmp_path):
    path = write(tmp_path, '[train]\nsteps = 20\n[optim]\nlr = 0.01\nwarmup_steps = 2\n'
                           '[precision]\nrecipe = "fp8-rowwise"\nskip_modules = ["output", "w2"]\n')
    cfg = load_config(path)
    assert cfg.train.steps == 20 and cfg.optim.lr == 0.01 and cfg.optim.warmup_steps == 2
    assert cfg.precision.recipe == "fp8-rowwise" and cfg.precision.skip_modules == ["output", "w2"]
    # keys the file does not mention keep their defaults
    assert cfg.data.seq_len == JobConfig().data.seq_len and cfg.train.seed == 0


def test_cli_overrides_beat_toml_beat_defaults(tmp_path):
    path = write(tmp_path, "[train]\nsteps = 20\nseed = 5\n[optim]\nlr = 0.01\n[model]\ndim = 64\n")
    cfg = load_config(path, {"train.steps": "30", "model.dim": "none", "data.seq_len": "64"})
    assert cfg.train.steps == 30  # CLI over TOML
    assert cfg.train.seed == 5 and cfg.optim.lr == 0.01  # TOML over defaults
    assert cfg.model.dim is None  # CLI can put an Optional back to "the preset's value"
    assert cfg.data.seq_len == 64  # CLI over defaults
    assert cfg.data.micro_batch_size == JobConfig().data.micro_batch_size  # untouched default


def test_equals_and_space_forms_parse_the_same():
    eq = parse_overrides(["--train.steps=40", "--precision.recipe=fp8-tensorwise", "--optim.lr=1e-3"])
    sp = parse_overrides(["--train.steps", "40", "--precision.recipe", "fp8-tensorwise", "--optim.lr", "1e-3"])
    mixed = parse_overrides(["--train.steps", "40", "--precision.recipe=fp8-tensorwise", "--optim.lr", "1e-3"])
    assert eq == sp == mixed == {"train.steps": "40", "precision.recipe": "fp8-tensorwise", "optim.lr": "1e-3"}
    # a value may itself contain '=' (only the first one splits)
    assert parse_overrides(["--data.path=/a=b"]) == {"data.path": "/a=b"}
    # the last of a repeated key wins
    assert parse_overrides(["--train.steps=1", "--train.steps", "7"]) == {"train.steps": "7"}


# -- types ----------------------------------------------------------------------------------


def test_int_and_float_parsing():
    cfg = load_config(None, {"train.steps": " 12 ", "optim.lr": "1", "optim.eps": "1e-6", "model.dim": "128"})
    assert cfg.train.steps == 12 and type(cfg.train.steps) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float  # float from int text
    assert cfg.optim.eps == 1e-6
    assert cfg.model.dim == 128 and type(cfg.model.dim) is int


def test_float_field_accepts_toml_int_as_float(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1\nweight_decay = 0\n"))
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float


@pytest.mark.parametrize("text,value", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("ON", True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False),
])
def test_bool_spellings(text, value):
    assert load_config(None, {"guard.skip_nonfinite": text}).guard.skip_nonfinite is value
    assert load_config(None, {"model.tie_embeddings": text}).model.tie_embeddings is value


def test_list_from_comma_text():
    cfg = load_config(None, {"precision.skip_modules": "output, w2 ,layers.0.*"})
    assert cfg.precision.skip_modules == ["output", "w2", "layers.0.*"]
    assert load_config(None, {"precision.skip_modules": ""}).precision.skip_modules == []
    assert load_config(None, {"precision.skip_modules": "output,,"}).precision.skip_modules == ["output"]


@pytest.mark.parametrize("text", ["none", "None", "NONE", "null"])
def test_optional_none(text):
    cfg = load_config(None, {"model.dim": text, "model.tie_embeddings": text})
    assert cfg.model.dim is None and cfg.model.tie_embeddings is None


def test_none_is_not_accepted_for_a_required_field():
    with raises_one_line(r"train\.steps='none' is not a valid int"):
        load_config(None, {"train.steps": "none"})


# -- error paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    ({"train.steps": "abc"}, r"train\.steps='abc' is not a valid int"),
    ({"train.steps": "2.5"}, r"train\.steps='2\.5' is not a valid int"),
    ({"train.steps": ""}, r"train\.steps='' is not a valid int"),
    ({"optim.lr": "fast"}, r"optim\.lr='fast' is not a valid float"),
    ({"guard.skip_nonfinite": "maybe"}, r"guard\.skip_nonfinite='maybe' is not a valid bool"),
    ({"model.dim": "wide"}, r"model\.dim='wide' is not a valid int"),
])
def test_bad_text_values_name_key_and_value(overrides, match):
    with raises_one_line(match):
        load_config(None, overrides)


@pytest.mark.parametrize("key,value,match", [
    ("precision.recipe", "fp9", r"precision\.recipe='fp9' is not allowed; choose one of: "),
    ("train.device", "tpu", r"train\.device='tpu' is not allowed; choose one of: auto, cpu, cuda"),
    ("data.verify", "none", r"data\.verify='none' is not allowed; choose one of: size, full"),
    ("model.preset", "70b", r"model\.preset='70b' is not allowed; choose one of: debug, "),
    ("optim.schedule", "linear", r"optim\.schedule='linear' is not allowed; choose one of: cosine, constant"),
])
def test_bad_choice_lists_allowed_values(key, value, match):
    with raises_one_line(match) as info:
        load_config(None, {key: value})
    if key == "precision.recipe":
        assert all(name in str(info.value) for name in RECIPES) and len(RECIPES) == 5


@pytest.mark.parametrize("key,value,match", [
    ("train.steps", "-1", r"train\.steps=-1 must be >= 0"),
    ("train.eval_interval", "-5", r"train\.eval_interval=-5 must be >= 0"),
    ("model.dim", "-64", r"model\.dim=-64 must be > 0"),
    ("data.micro_batch_size", "0", r"data\.micro_batch_size=0 must be > 0"),
    ("checkpoint.keep", "1", r"checkpoint\.keep=1 must be >= 2"),
    ("checkpoint.interval", "-1", r"checkpoint\.interval=-1 must be >= 0"),
    ("debug.stop_at_step", "-2", r"debug\.stop_at_step=-2 must be >= 0"),
    ("optim.lr", "-0.1", r"optim\.lr=-0\.1 must be > 0"),
    ("optim.min_lr_ratio", "1.5", r"optim\.min_lr_ratio=1\.5 must lie in \[0, 1\]"),
    ("optim.beta2", "-0.1", r"optim\.beta2=-0\.1 must lie in \[0, 1\)"),
    ("optim.beta1", "1.0", r"optim\.beta1=1\.0 must lie in \[0, 1\)"),
    ("data.seed", "-1", r"data\.seed=-1 must be >= 0"),
])
def test_out_of_range_numbers_name_key_and_value(key, value, match):
    with raises_one_line(match):
        load_config(None, {key: value})


def test_warmup_longer_than_training_is_refused(tmp_path):
    with raises_one_line(r"optim\.warmup_steps=10 exceeds train\.steps=5"):
        load_config(None, {"train.steps": "5"})  # default warm-up is 10
    with raises_one_line(r"optim\.warmup_steps=7 exceeds train\.steps=6"):
        load_config(write(tmp_path, "[train]\nsteps = 6\n[optim]\nwarmup_steps = 7\n"))
    assert load_config(None, {"train.steps": "5", "optim.warmup_steps": "5"}).optim.warmup_steps == 5


def test_unknown_section_and_key_suggest_the_closest(tmp_path):
    with raises_one_line(r"unknown config section 'trian' \(did you mean 'train'\?\); known: model, data, "):
        parse_overrides(["--trian.steps=3"])
    with raises_one_line(r"unknown config key 'train\.step' \(did you mean 'train\.steps'\?\); known: train\.steps"):
        parse_overrides(["--train.step=3"])
    with raises_one_line(r"unknown config section 'zzzz'; known: model, data, "):  # nothing close: no guess
        parse_overrides(["--zzzz.steps", "1"])
    path = write(tmp_path, "[trian]\nsteps = 3\n")
    with raises_one_line(rf"unknown config section \(in {path}\) 'trian' \(did you mean 'train'\?\)"):
        load_config(path)
    path = write(tmp_path, "[train]\nstep = 3\n", "b.toml")
    with raises_one_line(rf"^{path}: unknown config key 'train\.step' \(did you mean 'train\.steps'\?\)"):
        load_config(path)


@pytest.mark.parametrize("key", ["train.xyz", "optim.zzz"])
def test_unrelated_unknown_key_gets_no_suggestion(key):
    with pytest.raises(FP8LabError, match=rf"unknown config key '{key}'") as info:
        parse_overrides([f"--{key}=1"])
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("body,match", [
    ('[train]\nsteps = "10"\n', r"train\.steps='10' has type str; expected int"),
    ("[train]\nsteps = 1.5\n", r"train\.steps=1\.5 has type float; expected int"),
    ("[train]\nsteps = true\n", r"train\.steps=True has type bool; expected int"),
    ("[optim]\nlr = true\n", r"optim\.lr=True has type bool; expected float"),
    ('[guard]\nskip_nonfinite = "yes"\n', r"guard\.skip_nonfinite='yes' has type str; expected bool"),
    ('[precision]\nskip_modules = "output"\n', r"precision\.skip_modules='output' has type str; expected list"),
    ("[model]\ndim = 64.0\n", r"model\.dim=64\.0 has type float; expected int"),
])
def test_wrong_toml_type_names_file_key_and_type(tmp_path, body, match):
    path = write(tmp_path, body)
    with raises_one_line(match) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_toml_section_must_be_a_table(tmp_path):
    path = write(tmp_path, "train = 5\n")
    with raises_one_line(rf"{path}: \[train\] must be a table of keys"):
        load_config(path)


def test_skip_modules_must_hold_names(tmp_path):
    with raises_one_line(r"precision\.skip_modules must be a list of non-empty names"):
        load_config(write(tmp_path, '[precision]\nskip_modules = ["output", 3]\n'))


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"
    with raises_one_line(rf"config file {missing} does not exist"):
        load_config(missing)


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[train]\nsteps == 3\n")
    with raises_one_line(rf"config file {path} is not valid TOML: .*line 2"):
        load_config(path)


@pytest.mark.parametrize("args,match", [
    (["train.steps=3"], r"unexpected argument 'train\.steps=3'; overrides look like --section\.key=value"),
    (["--"], r"unexpected argument '--'"),
    (["--train.steps"], r"--train\.steps needs a value: --train\.steps=VALUE"),
    (["--steps=3"], r"config key 'steps' must be section\.key"),
])
def test_malformed_override_arguments(args, match):
    with raises_one_line(match):
        parse_overrides(args)


def test_config_from_dict_names_its_origin():
    with raises_one_line(r"^saved run: train\.steps='x' has type str"):
        config_from_dict({"train": {"steps": "x"}}, origin="saved run")


def test_config_path_that_is_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FP8LabError, match=str(tmp_path)):
        load_config(tmp_path)


def test_config_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[data]\npath = "/d\xe9j\xe0"\n')
    with pytest.raises(FP8LabError, match=str(path)):
        load_config(path)


@pytest.mark.parametrize("key", ["optim.lr", "optim.eps", "optim.weight_decay", "optim.grad_clip"])
def test_nan_floats_are_refused(key):
    with pytest.raises(FP8LabError, match=key.replace(".", r"\.")):
        load_config(None, {key: "nan"})


# -- round trip and documentation -------------------------------------------------------------


def test_to_toml_round_trips_defaults(tmp_path):
    cfg = JobConfig()
    path = write(tmp_path, cfg.to_toml())
    assert load_config(path) == cfg


def test_to_toml_round_trips_a_non_default_config(tmp_path):
    cfg = load_config(None, {
        "model.preset": "125m", "model.dim": "96", "model.tie_embeddings": "false", "model.vocab_size": "512",
        "data.path": "/data/my set", "data.verify": "full", "train.steps": "7", "train.device": "cpu",
        "optim.lr": "1.5e-4", "optim.warmup_steps": "0", "optim.schedule": "constant", "optim.grad_clip": "0",
        "precision.recipe": "fp8-rowwise-gw-hp", "precision.skip_modules": "output,layers.0.*",
        "guard.skip_nonfinite": "no", "logging.progress": "off", "debug.stop_at_step": "3",
    })
    text = cfg.to_toml()
    assert "dim = 96" in text and "n_layers" not in text  # None is "the preset's value": left out
    back = load_config(write(tmp_path, text))
    assert back == cfg
    assert back.flat() == cfg.flat()
    assert back.to_toml() == text
    # an empty list survives too
    cfg.precision.skip_modules = []
    assert load_config(write(tmp_path, cfg.to_toml(), "c.toml")).precision.skip_modules == []


def test_describe_fields_mentions_every_key_with_default_and_choices():
    text = describe_fields()
    for section in SECTIONS:
        assert f"[{section}]" in text
    for key, value in JobConfig().flat().items():
        assert f"  {key} = {value!r}" in text, key
    assert "precision.recipe = 'bf16' (" + " | ".join(RECIPES) + ")" in text
    assert "data.verify = 'size' (size | full)" in text
    # every field's documentation is there
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"] and f.metadata["doc"] in text


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.model.preset in ("debug", "125m", "350m", "1b", "3b", "8b")
    assert cfg.data.seq_len > 0 and cfg.train.steps >= cfg.optim.warmup_steps
