"""The defence registry: `seamlm defend --method`, the refusal-SFT baseline, and a defence plugged in from outside."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from seamlm.cli import main
from seamlm.config import BaseConfig
from seamlm.data.splits import prompt_hash
from seamlm.defense import DEFENSES, Defense, defense_class, register_defense
from seamlm.errors import ConfigError
from tests.conftest import BENIGN, REFUSAL


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_list_methods_names_every_registered_defence(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["defend", "--list-methods"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert {"seam", "refusal-sft"} <= set(DEFENSES)
    for name, cls in DEFENSES.items():
        assert name in out and cls.Config.__name__ in out
    assert "trains on: refusal, benign; config: FinetuneConfig" in out
    assert out.startswith("seam "), "the default defence is listed first"


def test_unknown_defence_is_a_clear_error(tiny_model_dir, data_files, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown defence 'tar'; known: .*seam"):
        defense_class("tar")
    rc = main(["defend", "--method", "tar", "--model", str(tiny_model_dir), "--data", "offline-default",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown defence 'tar'" in capsys.readouterr().err


def test_refusal_sft_trains_and_saves_a_loadable_model(tiny_model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "aligned"
    rc = main(["defend", "--method", "refusal-sft", "--model", str(tiny_model_dir), "--refusal",
               str(data_files["refusal"]), "--benign", str(data_files["benign"]), "--out", str(out),
               "--max_steps", "3", "--batch_size", "2", "--lr", "1e-3", "--max_length", "64"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)
    before, after = _weights(tiny_model_dir), _weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    saved = json.loads((out / "model" / "seamlm_run.json").read_text())
    assert saved["method"] == "refusal-sft" and saved["defense_config"]["max_steps"] == 3
    assert saved["data_sizes"] == {"refusal": len(REFUSAL), "benign": len(BENIGN)}
    trained = set((out / "model" / "trained_prompts.txt").read_text().split())
    assert {prompt_hash(e.prompt) for e in REFUSAL + BENIGN} <= trained
    assert json.loads((out / "run.json").read_text())["defense"] == "refusal-sft"
    # its result rows name the defence without --defense (read from the model's seamlm_run.json)
    from tests.test_cli import TINY_EVAL

    tiny_eval = [a.replace("--eval.", "--") for a in TINY_EVAL]
    assert main(["eval", "--model", str(out / "model"), "--out", str(tmp_path / "ev"), *tiny_eval]) == 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert rows and {r["defense"] for r in rows} == {"refusal-sft"}
    # a second run into the same folder would overwrite a finished model: refused
    rc = main(["defend", "--method", "refusal-sft", "--model", str(tiny_model_dir), "--refusal",
               str(data_files["refusal"]), "--benign", str(data_files["benign"]), "--out", str(out)])
    assert rc == 2 and "holds a finished model already" in capsys.readouterr().err


def test_refusal_sft_leaves_an_earlier_run_alone(tiny_model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "data_manifest.json").write_text("{}")
    rc = main(["defend", "--method", "refusal-sft", "--model", str(tiny_model_dir), "--data", "offline-default",
               "--out", str(out)])
    assert rc == 2 and "holds an earlier run (log.jsonl)" in capsys.readouterr().err
    # refused before anything was written: the earlier run's files are as they were
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n' and (out / "data_manifest.json").read_text() == "{}"


@pytest.mark.parametrize("extra,message", [
    (["--harmful", "H"], "trains on refusal, benign only: drop --harmful"),
    (["--resume"], "keeps no checkpoints"),
    (["--beta", "1"], "unknown FinetuneConfig key(s)"),
])
def test_refusal_sft_bad_options_are_errors(tiny_model_dir, data_files, tmp_path, capsys, extra, message):
    args = ["defend", "--method", "refusal-sft", "--model", str(tiny_model_dir), "--refusal",
            str(data_files["refusal"]), "--benign", str(data_files["benign"]), "--out", str(tmp_path / "o")]
    extra = [str(data_files["harmful"]) if x == "H" else x for x in extra]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "model").exists()


def test_refusal_sft_without_its_benign_stream_names_it(tiny_model_dir, data_files, tmp_path, capsys):
    rc = main(["defend", "--method", "refusal-sft", "--model", str(tiny_model_dir), "--refusal",
               str(data_files["refusal"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing --benign" in capsys.readouterr().err


@dataclass
class _ShrinkConfig(BaseConfig):
    factor: float = 0.5


def test_a_registered_defence_runs_from_the_command_line(tiny_model_dir, data_files, tmp_path, monkeypatch):
    """The plug-in contract: a new Defense subclass, registered, is a `--method` with its own config keys."""
    from seamlm.models import save_model

    class Shrink(Defense):  # a weight edit, so the test needs no training loop of its own
        name, summary, Config, streams = "shrink-test", "scales every weight", _ShrinkConfig, ("benign",)

        def run(self, model, tokenizer, data, out_dir, *, resume=False, run_info=None, ctx=None):
            seen = self.examples(data)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(self.config.factor)
            save_model(model, tokenizer, Path(out_dir) / "model", {"method": self.name, "n": len(seen["benign"])},
                       trained_prompts=[e.prompt for e in seen["benign"]])
            return Path(out_dir) / "model"

    monkeypatch.setattr("seamlm.defense.base.DEFENSES", dict(DEFENSES))
    register_defense(Shrink)
    out = tmp_path / "shrunk"
    assert main(["defend", "--method", "shrink-test", "--model", str(tiny_model_dir), "--benign",
                 str(data_files["benign"]), "--out", str(out), "--factor", "0.25"]) == 0
    before, after = _weights(tiny_model_dir), _weights(out / "model")
    key = next(k for k in before if k.endswith("q_proj.weight"))
    assert torch.allclose(after[key], 0.25 * before[key])
    assert json.loads((out / "model" / "seamlm_run.json").read_text())["n"] == len(BENIGN)


def test_register_defense_checks_its_streams():
    class Bad(Defense):
        name, summary, Config, streams = "bad", "", _ShrinkConfig, ("harmful", "poems")

        def run(self, *a, **k):  # pragma: no cover - never registered
            raise AssertionError

    with pytest.raises(ConfigError, match="streams must be among"):
        register_defense(Bad)

    class Impostor(Defense):
        name, summary, Config, streams = "seam", "", _ShrinkConfig, ("benign",)

        def run(self, *a, **k):  # pragma: no cover - never registered
            raise AssertionError

    with pytest.raises(ConfigError, match="'seam' is taken by SEAMDefense"):
        register_defense(Impostor)
    assert DEFENSES["seam"].__name__ == "SEAMDefense"
