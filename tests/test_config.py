"""Strict configs: unknown keys and bad values are errors; YAML and --key value overrides compose."""

import pytest

from seamlm.config import parse_overrides
from seamlm.defense import DefenseConfig
from seamlm.errors import ConfigError


def test_unknown_key_is_an_error_with_suggestion():
    with pytest.raises(ConfigError, match=r"'bta' \(did you mean 'beta'\?\)"):
        DefenseConfig.from_dict({"bta": 0.1})


def test_string_values_are_coerced_by_field_type():
    cfg = DefenseConfig.from_dict({"steps": "5", "beta": "1e-1", "max_grad_norm": "none",
                                   "mask_benign_prompt": "false", "unlearn_loss": "final_layer"})
    assert (cfg.steps, cfg.beta, cfg.max_grad_norm, cfg.mask_benign_prompt) == (5, 0.1, None, False)
    assert DefenseConfig.from_dict({"steps": "1e3"}).steps == 1000  # scientific notation for a whole number


@pytest.mark.parametrize("values,match", [
    ({"steps": "five"}, "expects int"),
    ({"steps": 2.5}, "expects int"),
    ({"steps": "5e-1"}, "expects int"),  # was read as int(0.5) = 0
    ({"unlearn_loss": "lens"}, "must be one of"),
    ({"epsilon": 0}, "epsilon must be > 0"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ({"compute_dtype": "float16"}, "must be one of \\[.auto., .float32., .bfloat16.\\]"),
    ({"lookahead_lr": 1e-4, "beta": 0}, "beta = 0 switches L_sd off"),
    ({"lookahead_lr": -1e-4}, "lookahead_lr must be >= 0"),
    ({"lookahead_steps": 3}, "lookahead_steps needs lookahead_lr > 0"),
    ({"lookahead_weight": 0.5}, "lookahead_weight splits L_sd"),
    ({"lookahead_lr": 1e-4, "lookahead_weight": 0.0}, r"lookahead_weight must be in \(0, 1\]"),
    ({"lookahead_lr": 1e-4, "lookahead_weight": 1.5}, r"lookahead_weight must be in \(0, 1\]"),
])
def test_bad_values(values, match):
    with pytest.raises(ConfigError, match=match):
        DefenseConfig.from_dict(values)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("beta: 0.5\nsteps: 10\n")
    cfg = DefenseConfig.from_yaml(path, {"steps": "3"})
    assert (cfg.beta, cfg.steps) == (0.5, 3)
    path.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        DefenseConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        DefenseConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder; name a YAML file"):
        DefenseConfig.from_yaml(tmp_path)
    path.write_text("steps: 5\nbeta: 0.5\nsteps: 500\n")
    with pytest.raises(ConfigError, match="(?s)key 'steps' is given twice.*line 3"):
        DefenseConfig.from_yaml(path)
    path.write_text("steps: 5\neval: {seed: 1, hs_prompts: 2}\nother: {seed: 1}\n")  # one key in two mappings: fine
    from seamlm.config import read_yaml_mapping

    assert read_yaml_mapping(path)["other"] == {"seed": 1}
    path.write_text("base: &b {seed: 1, hs_prompts: 2}\nderived:\n  <<: *b\n  seed: 3\n")  # a merge key may be overridden
    assert read_yaml_mapping(path)["derived"] == {"seed": 3, "hs_prompts": 2}
    path.write_text("base: &b {seed: 1}\nderived:\n  <<: *b\n  steps: 1\n  steps: 2\n")
    with pytest.raises(ConfigError, match="key 'steps' is given twice"):
        read_yaml_mapping(path)
    path.write_text("steps: 1\n2: 2\non: 3\n")  # YAML reads these keys as a number and a boolean
    with pytest.raises(ConfigError, match=r"d.yaml: keys are field names, got 2, True \(quote a key"):
        DefenseConfig.from_yaml(path)
    path.write_bytes(b"steps: 1\nlr: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"d.yaml is not UTF-8 text \(invalid start byte at byte 13\)"):
        DefenseConfig.from_yaml(path)


def test_parse_overrides():
    assert parse_overrides(["--steps", "5", "--warmup-ratio=0.2"]) == {"steps": "5", "warmup_ratio": "0.2"}
    with pytest.raises(ConfigError, match="--steps needs a value: --steps VALUE or --steps=VALUE \\(a flag of another sub-command"):
        parse_overrides(["--steps", "--beta", "1"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["steps"])
    with pytest.raises(ConfigError, match=r"--warmup_ratio is given twice \('0.1' and '0.2'\)"):
        parse_overrides(["--warmup-ratio", "0.1", "--warmup_ratio=0.2"])
    with pytest.raises(ConfigError, match="goes before the sub-command"):
        parse_overrides(["--steps", "5", "-v"])


def test_tuple_fields_parse_comma_lists():
    import dataclasses

    from seamlm.config import BaseConfig

    @dataclasses.dataclass
    class Grid(BaseConfig):
        lrs: tuple[float, ...] = (1e-4,)
        seeds: tuple[int, ...] = (0,)

    g = Grid.from_dict({"lrs": "2e-5, 1e-4", "seeds": [1, 2]})
    assert g.lrs == (2e-5, 1e-4) and g.seeds == (1, 2)
    assert g.to_dict() == {"lrs": [2e-5, 1e-4], "seeds": [1, 2]}
    with pytest.raises(ConfigError, match="expects float"):
        Grid.from_dict({"lrs": "fast"})
    with pytest.raises(ConfigError, match="comma-separated"):
        Grid.from_dict({"lrs": "1e-4,"})


def test_collective_timeout_comes_from_the_environment_and_bad_values_are_errors(monkeypatch):
    from datetime import timedelta

    from seamlm.distributed import TIMEOUT_ENV, collective_timeout
    from seamlm.errors import ConfigError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == timedelta(hours=2)
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == timedelta(seconds=90)
    for bad in ("0", "-5", "ten"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match="positive number of seconds"):
            collective_timeout()


def test_changed_from_a_saved_config_counts_new_fields_at_their_default():
    cfg = DefenseConfig(beta=0.5)
    saved = cfg.to_dict()
    assert cfg.changed_from(saved) == {}
    del saved["lookahead_weight"]  # written before the field existed: it was at its default
    assert cfg.changed_from(saved) == {}
    assert cfg.replace(lookahead_lr=1e-3, lookahead_weight=0.5).changed_from(saved) == {
        "lookahead_lr": (0.0, 1e-3), "lookahead_weight": (1.0, 0.5)}
    assert cfg.changed_from({**cfg.to_dict(), "beta": 0.1, "gone": 1}) == {"beta": (0.1, 0.5), "gone": (1, None)}


def test_truncate_first_reaches_every_demo_stage_and_leaves_older_cells_settings_alone():
    """The demo's ``truncate_first`` is each training stage's (align, SEAM, every attack grid); at its default the
    field is left out of an attack cell's stored settings and key, so cells stored before it existed still count."""
    from seamlm.attack import cell_key
    from seamlm.finetune import FinetuneConfig
    from seamlm.pipeline import DemoConfig
    from seamlm.recipes import make_recipe

    demo = DemoConfig(truncate_first="prompt", attack_lora=True)
    stages = [demo.align_config(), demo.defense_config("unused"), *demo.attack_grids(),
              demo.attack_grids()[0].run_config(lr=1e-4)]
    assert [c.truncate_first for c in stages] == ["prompt"] * len(stages)
    assert {c.truncate_first for c in (DemoConfig().align_config(), DemoConfig().defense_config("x"))} == {"answer"}
    assert "truncate_first" not in FinetuneConfig().trajectory_dict()
    assert FinetuneConfig(truncate_first="prompt").trajectory_dict()["truncate_first"] == "prompt"
    sft = make_recipe("sft")
    default_key = cell_key(FinetuneConfig(), sft, 8)
    assert "-h" not in default_key and cell_key(FinetuneConfig(truncate_first="prompt"), sft, 8).startswith(default_key + "-h")
    with pytest.raises(ConfigError, match="must be one of"):
        FinetuneConfig.from_dict({"truncate_first": "middle"})
