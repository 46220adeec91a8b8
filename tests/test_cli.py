"""`seamlm defend` end to end on a tiny model, and the errors users see for bad input."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seamlm.cli import main
from seamlm.errors import ConfigError
from seamlm.evaluate.metrics import EvalConfig


def _defend_args(model_dir, files, out, *extra):
    return ["defend", "--model", str(model_dir), "--harmful", str(files["harmful"]), "--refusal", str(files["refusal"]),
            "--benign", str(files["benign"]), "--out", str(out), *extra]


def test_round_trip(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "defend.yaml"
    cfg.write_text("beta: 0.5\nbatch_size: 2\nmax_length: 64\nsteps: 10\n")
    rc = main(_defend_args(tiny_model_dir, data_files, out, "--config", str(cfg), "--steps", "3", "--lr", "1e-3"))
    assert rc == 0
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # --steps overrode the YAML
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["beta"] == 0.5 and run["config"]["lr"] == 1e-3 and run["model"] == str(tiny_model_dir)
    # what reproduces the run: the model's weights digest, the load dtype and the command line
    assert run["model_identity"].startswith("sha256:") and run["dtype"] == "float32" and "--lr" in run["argv"]
    assert run["device"] == "cpu"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_an_output_dir_in_the_yaml_must_agree_with_out(tiny_model_dir, data_files, tmp_path, capsys):
    cfg = tmp_path / "defend.yaml"
    cfg.write_text(f"steps: 1\nbatch_size: 2\noutput_dir: {tmp_path / 'elsewhere'}\n")
    assert main(_defend_args(tiny_model_dir, data_files, tmp_path / "run", "--config", str(cfg))) == 2
    assert "sets output_dir" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()
    cfg.write_text(f"steps: 1\nbatch_size: 2\noutput_dir: {tmp_path / 'run'}\n")  # the same folder: fine
    assert main(_defend_args(tiny_model_dir, data_files, tmp_path / "run", "--config", str(cfg))) == 0


def test_resume_flag_finishes_a_killed_run(tiny_model_dir, data_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = _defend_args(tiny_model_dir, data_files, out, "--steps", "4", "--batch_size", "2", "--checkpoint_every", "2")
    assert main(args) == 0
    # pretend the run died after its step-2 checkpoint
    import shutil

    shutil.rmtree(out / "model")
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "L_ul"')  # and was killed mid-write of a log row
    assert main(args) == 1  # refuses to overwrite a run silently
    import seamlm.distributed

    with monkeypatch.context() as m:  # a changed setting is refused before any model loads
        m.setattr(seamlm.distributed, "load_model_for_rank", None)
        capsys.readouterr()
        assert main([*args, "--resume", "--beta", "5"]) == 1
        assert "the config changed (beta: 0.01 -> 5.0)" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "model" / "model.safetensors").is_file()
    finished = (out / "model" / "model.safetensors").read_bytes()
    assert main(args) == 1 and main([*args, "--resume"]) == 1  # a finished run is neither redone nor resumed
    assert (out / "model" / "model.safetensors").read_bytes() == finished


def test_a_finished_run_without_checkpoints_is_not_overwritten(tiny_model_dir, data_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = _defend_args(tiny_model_dir, data_files, out, "--steps", "2", "--batch_size", "2")  # ends before a checkpoint
    assert main(args) == 0 and not (out / "checkpoints").exists()
    log_before = (out / "log.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 1
    assert "already holds a finished run (model/)" in capsys.readouterr().err
    assert (out / "log.jsonl").read_text() == log_before


def test_a_finished_run_keeps_its_data_manifest(tiny_model_dir, tmp_path, capsys):
    """A second `defend` into a finished run's folder is refused before it writes anything: the manifest of the data
    the model was trained on stays (not replaced by the refused run's, here another split seed)."""
    out = tmp_path / "run"
    args = ["defend", "--model", str(tiny_model_dir), "--data", "offline-default", "--out", str(out), "--steps", "1",
            "--batch_size", "2", "--max_length", "48"]
    assert main(args) == 0
    manifest = (out / "data_manifest.json").read_text()
    capsys.readouterr()
    assert main([*args, "--data-seed", "1"]) == 1
    assert "already holds a finished run (model/)" in capsys.readouterr().err
    assert (out / "data_manifest.json").read_text() == manifest


def test_a_refused_resume_keeps_the_unfinished_runs_data_manifest(tiny_model_dir, tmp_path, capsys):
    """--resume with another split seed is refused before the killed run's manifest is replaced."""
    import shutil

    out = tmp_path / "run"
    args = ["defend", "--model", str(tiny_model_dir), "--data", "offline-default", "--out", str(out), "--steps", "2",
            "--batch_size", "2", "--max_length", "48", "--checkpoint_every", "1"]
    assert main(args) == 0
    shutil.rmtree(out / "model")  # as if killed after its last checkpoint
    manifest = (out / "data_manifest.json").read_text()
    capsys.readouterr()
    assert main([*args, "--resume", "--data-seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "trained on other data" in err and "seed: 0 -> 1" in err, err
    assert (out / "data_manifest.json").read_text() == manifest
    (out / "data_manifest.json").write_text(manifest[:40])  # cut short: a clear error, not a traceback
    assert main([*args, "--resume"]) == 2 and "data_manifest.json is unreadable" in capsys.readouterr().err
    (out / "data_manifest.json").write_text(manifest)
    assert main([*args, "--resume"]) == 0


@pytest.mark.parametrize("case,match,code", [
    ("unknown_key", "unknown DefenseConfig key(s) 'bta' (did you mean 'beta'?)", 2),
    ("missing_column", "lacks column(s) ['response']", 1),
    ("empty_file", "is empty", 1),
    ("missing_file", "does not exist", 1),
    ("bad_value", "steps must be > 0", 2),
    ("bad_device", "unknown device 'bogus'; use cpu, cuda", 2),
    ("cuda_without_cuda", "sees no CUDA GPU", 2),
    ("out_is_a_file", "a file is where a folder is needed: choose another path", 1),
    ("harmful_is_a_folder", "is a folder, not a data file", 1),
    ("resume_without_checkpoint", "--resume: no checkpoint under", 1),
    ("tf32_on_cpu", "coupling_precision=tf32 needs a CUDA device", 2),
])
def test_bad_inputs(tiny_model_dir, data_files, tmp_path, capsys, monkeypatch, case, match, code):
    import seamlm.distributed

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    if case not in ("bad_device", "cuda_without_cuda", "out_is_a_file"):  # found before the model loads
        monkeypatch.setattr(seamlm.distributed, "load_model_for_rank", no_model)
    files = dict(data_files)
    extra = []
    if case == "unknown_key":
        extra = ["--bta", "0.1"]
    elif case == "missing_column":
        files["benign"] = tmp_path / "b.jsonl"
        files["benign"].write_text('{"prompt": "q", "answer": "a"}\n')
    elif case == "empty_file":
        files["refusal"] = tmp_path / "r.jsonl"
        files["refusal"].write_text("")
    elif case == "missing_file":
        files["harmful"] = tmp_path / "nope.jsonl"
    elif case == "bad_value":
        extra = ["--steps", "0"]
    elif case == "bad_device":
        extra = ["--device", "bogus"]
    elif case == "cuda_without_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra = ["--device", "cuda"]
    elif case == "out_is_a_file":
        (tmp_path / "out").write_text("not a folder")
    elif case == "harmful_is_a_folder":
        files["harmful"] = tmp_path
    elif case == "resume_without_checkpoint":
        extra = ["--resume"]
    elif case == "tf32_on_cpu":
        extra = ["--coupling_precision", "tf32", "--device", "cpu"]
    rc = main(_defend_args(tiny_model_dir, files, tmp_path / "out", *extra))
    assert rc == code
    assert match in capsys.readouterr().err


def test_a_model_that_fails_to_load_leaves_no_run_files(tmp_path, capsys, monkeypatch):
    """The bundle's manifest is written once the model has loaded: a failed load leaves no --out (the folder the
    command made for its lock goes with it)."""
    import seamlm.distributed
    from seamlm.errors import ModelLoadError

    def fails(*a, **k):
        raise ModelLoadError("cannot load this model")

    monkeypatch.setattr(seamlm.distributed, "load_model_for_rank", fails)
    out = tmp_path / "run"
    assert main(["defend", "--model", "some/hub-model", "--data", "offline-default", "--out", str(out)]) == 1
    assert "cannot load this model" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("template,complaint", [("{{ x }", "syntax error at line 1: unexpected '}'"),
                                               ("{{ raise_exception('no user role') }}", "it fails with: no user role")])
def test_a_model_whose_chat_template_breaks_is_a_clear_error(tmp_path, data_files, capsys, template, complaint):
    from tests.conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = template
    model_dir = tmp_path / "broken-template"
    make_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for args in (["eval", "--model", str(model_dir), "--out", str(tmp_path / "ev"), "--judge", "keyword"],
                 _defend_args(model_dir, data_files, tmp_path / "def")):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"error: the chat template of model '{model_dir}' cannot format a prompt ({complaint}). Fix the " \
               "template" in err and "plain fallback format" in err


def test_a_bad_command_line_key_is_blamed_on_the_command_line_not_the_yaml(tmp_path, capsys):
    """With --config, an unknown --key is the command line's typo: the error must not send the user to the file."""
    yml = tmp_path / "c.yaml"
    yml.write_text("steps: 2\n")
    cases = [
        ["defend", "--model", "m", "--data", "offline-default", "--out", str(tmp_path / "d"), "--config", str(yml)],
        ["attack", "--model", "m", "--out", str(tmp_path / "a"), "--config", str(yml)],
        ["eval", "--model", "m", "--out", str(tmp_path / "e"), "--eval-config", str(yml)],
        ["demo", "--out", str(tmp_path / "demo")],
    ]
    for args, cls in zip(cases, ("DefenseConfig", "AttackConfig", "EvalConfig", "DemoConfig"), strict=True):
        assert main([*args, "--bogus", "1"]) == 2, args
        err = capsys.readouterr().err
        assert f"command line: unknown {cls} key(s) 'bogus'" in err and str(yml) not in err, err
    assert not any((tmp_path / d).exists() for d in ("d", "a", "e", "demo"))
    yml.write_text("bogus: 1\n")  # the file's own typo still names the file
    assert main([*cases[0][:-2], "--config", str(yml)]) == 2
    assert f"{yml}: unknown DefenseConfig key(s) 'bogus'" in capsys.readouterr().err


def test_offline_default_size_options_are_checked(tmp_path, capsys):
    for option, why in (("attack_benign=-1", "attack_benign must be >= 1"), ("benign_piqa=-1", "benign_piqa must be >= 0")):
        assert main(["data", "build", "offline-default", "--out", str(tmp_path / "o"), "--option", option]) == 1
        assert why in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_dashed_options_take_their_underscored_spelling_and_path_errors_are_clean(tmp_path, capsys, monkeypatch):
    """Config keys are --under_scored, so users type --data_seed, --no_pre … too: both spellings work."""
    import seamlm.data.bundles as bundles
    from seamlm.cli import build_parser

    def no_build(*a, **k):
        raise AssertionError("a bad --out is refused before the bundle is built")

    monkeypatch.setattr(bundles, "build_bundle", no_build)

    args, extra = build_parser().parse_known_args(["attack", "--model", "m", "--out", "o", "--data_seed", "3",
                                                    "--no_pre", "--eval_config", "e.yaml"])
    assert (args.data_seed, args.no_pre, args.eval_config, extra) == (3, True, "e.yaml", [])
    (tmp_path / "f").write_text("")
    assert main(["data", "build", "offline-default", "--out", str(tmp_path / "f"), "--holdout_categories", ""]) == 1
    assert "not an empty folder or a bundle" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path) in err
    assert main(["report", str(tmp_path / "nosuch.jsonl"), "--out", str(tmp_path / "r")]) == 1
    assert "nosuch.jsonl does not exist" in capsys.readouterr().err
    assert main(["data", "distill", "--model", "m", "--prompts", "p.jsonl", "--out", "o.jsonl",
                 "--max_new_tokens", "0"]) == 2
    assert "--max-new-tokens and --batch-size must be >= 1" in capsys.readouterr().err
    assert main(["data", "distill", "--model", "m", "--prompts", "p.jsonl", "--out", str(tmp_path)]) == 2
    assert "is a folder; give the JSONL file to write" in capsys.readouterr().err


def test_console_entry_point():
    res = subprocess.run([sys.executable, "-m", "seamlm", "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "seamlm 0.1.0" in res.stdout


def test_data_list_and_build(tmp_path, capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "| pyrit-harm | harmful_qa |" in out and "offline-default" in out and "CC-BY-NC-4.0" in out
    repnoise = next(line for line in out.splitlines() if line.startswith("| repnoise-refusals |"))
    assert repnoise.endswith("| file: needs path= |"), repnoise  # not on the Hub: `datasets` alone cannot load it
    assert main(["data", "build", "offline-default", "--out", str(tmp_path / "b"), "--holdout-categories", "violence"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["holdout_categories"] == ["violence"] and manifest["overlaps"] == {}
    harmful = [json.loads(x) for x in (tmp_path / "b" / "defense_harmful.jsonl").read_text().splitlines()]
    assert harmful and all(r["category"] != "violence" for r in harmful)
    # HS measures the held-out category: HarmBench, which spans the trained ones, is left out
    hs = [json.loads(x) for x in (tmp_path / "b" / "eval_harmful.jsonl").read_text().splitlines()]
    assert hs and {r["category"] for r in hs} == {"violence"}
    assert main(["data", "build", "no-such-bundle", "--out", str(tmp_path / "c")]) == 1
    assert "unknown data bundle" in capsys.readouterr().err


def test_defend_with_a_built_bundle(tiny_model_dir, tmp_path):
    assert main(["data", "build", "offline-default", "--out", str(tmp_path / "b")]) == 0
    out = tmp_path / "run"
    rc = main(["defend", "--model", str(tiny_model_dir), "--data", str(tmp_path / "b"), "--out", str(out),
               "--steps", "2", "--batch_size", "2", "--max_length", "64"])
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"] == str(tmp_path / "b") and run["data_sizes"]["harmful"] == run["data_counts"]["harmful"]
    assert json.loads((out / "data_manifest.json").read_text())["overlaps"] == {}


def test_defend_data_and_files_are_exclusive(tiny_model_dir, data_files, tmp_path, capsys):
    rc = main(["defend", "--model", str(tiny_model_dir), "--data", "offline-default", "--harmful",
               str(data_files["harmful"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "either --data or" in capsys.readouterr().err
    rc = main(["defend", "--model", str(tiny_model_dir), "--harmful", str(data_files["harmful"]), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing --refusal, --benign" in capsys.readouterr().err
    files = {k: str(data_files[k]) for k in ("harmful", "refusal", "benign")}
    rc = main(["defend", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
               *[a for k, v in {**files, "benign": str(tmp_path / "nofile.jsonl")}.items() for a in (f"--{k}", v)]])
    assert rc == 1 and "nofile.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # a refused defence leaves no folder (the lock it took is gone with it)


def test_a_defend_folder_in_use_is_refused_and_left_as_it_was(tiny_model_dir, data_files, tmp_path, capsys):
    """Two defences into one --out would interleave one log.jsonl and each replace the other's model/: the second is
    refused while the first holds the folder, and runs once it has ended."""
    from seamlm.runinfo import folder_lock

    out = tmp_path / "o"
    argv = ["defend", "--model", str(tiny_model_dir), "--out", str(out), "--steps", "1", "--batch_size", "2",
            *[a for k in ("harmful", "refusal", "benign") for a in (f"--{k}", str(data_files[k]))]]
    with folder_lock(out, "defend"):
        assert main(argv) == 2
        assert "is in use by another seamlm command (seamlm defend, pid" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".seamlm.lock"]
    assert main(argv) == 0 and (out / "model" / "config.json").is_file()


TINY_EVAL = ["--eval.judge", "keyword", "--eval.hs_prompts", "2", "--eval.max_new_tokens", "4", "--eval.zs_tasks",
             "arc_easy", "--eval.zs_limit", "2", "--eval.coherence_examples", "2"]


def test_attack_then_report(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "att"
    rc = main(["attack", "--model", str(tiny_model_dir), "--label", "tiny", "--out", str(out), "--learning_rates",
               "1e-4,1e-3", "--num_samples", "4", "--batch_size", "2", *TINY_EVAL])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["cell"] for r in rows} == {"pre", "sft-full-adamw-lr0.0001-n4-ep1-b2-s0", "sft-full-adamw-lr0.001-n4-ep1-b2-s0"}
    assert all(r["data_manifest"] for r in rows) and (out / "attack_config.tiny.yaml").is_file()
    capsys.readouterr()
    assert main(["report", str(out / "results.jsonl"), "--out", str(out / "report")]) == 0
    assert "| tiny |" in (out / "report" / "report.md").read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the closing line names the three files it wrote
    named = [out / "report" / f for f in ("report.md", "report.html", "results.csv")]
    assert last == f"report: {named[0]} (HTML: {named[1]}; every row: {named[2]})" and all(f.is_file() for f in named)
    assert (out / "report" / "hs_vs_lr.png").is_file()
    # a later grid into the same folder, here refused (other data for the same label), rewrites none of its records
    records = {f: (out / f).read_text() for f in ("data_manifest.json", "attack_config.tiny.yaml")}
    rc = main(["attack", "--model", str(tiny_model_dir), "--label", "tiny", "--out", str(out), "--learning_rates",
               "3e-3", "--num_samples", "4", "--batch_size", "2", "--data-seed", "1", "--no-pre", *TINY_EVAL])
    assert rc == 1 and "made with another data" in capsys.readouterr().err
    assert {f: (out / f).read_text() for f in records} == records
    beside = sorted(p.name for p in out.iterdir() if p.name.startswith(("data_manifest.", "attack_config.")))
    assert len(beside) == 4  # this command's manifest and config went beside the folder's
    # (a manifest beside is named by the digest result rows carry in data_manifest)
    assert any(re.fullmatch(r"data_manifest\.[0-9a-f]{16}\.json", n) for n in beside), beside
    # a mistyped model fails before --out is made
    assert main(["eval", "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "e"), "--judge", "keyword"]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "e").exists()
    # a judge that cannot load stops the command before the data's manifest is recorded in --out
    rc = main(["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "j"), "--judge", "beavertails",
               "--judge_model", str(tmp_path / "no-judge")])
    assert rc == 2 and "no-judge: no such file or folder" in capsys.readouterr().err
    assert not list((tmp_path / "j").glob("data_manifest*")), list((tmp_path / "j").iterdir())


def _patch_load_model(monkeypatch: pytest.MonkeyPatch, fake) -> None:
    """Every ``load_model`` an attack calls: seamlm.models' (looked up at call time) and the one seamlm.attack bound
    when first imported (patching only the first would let a first import during the patch keep the fake)."""
    import seamlm.attack
    import seamlm.models

    monkeypatch.setattr(seamlm.models, "load_model", fake)
    monkeypatch.setattr(seamlm.attack, "load_model", fake)


@pytest.mark.parametrize("lora,match", [
    (["--lora_layers", "0,9"], r"lora_layers \[9\] are beyond this model's 2 decoder layers"),
    (["--lora_target_modules", "c_attn"], r"lora_target_modules \['c_attn'\] are not modules of this model"),
])
def test_a_lora_target_the_model_lacks_stops_the_attack_before_anything_is_written(tiny_model_dir, tmp_path, capsys,
                                                                                  monkeypatch, lora, match):
    """Checked on the model's skeleton (its config on the meta device): not after the pre-attack evaluation, and
    without leaving an attack_config record that a corrected rerun would have to sit beside."""
    def no_load(*a, **k):
        raise AssertionError("the check needs no weights")

    _patch_load_model(monkeypatch, no_load)
    out = tmp_path / "att"
    rc = main(["attack", "--model", str(tiny_model_dir), "--label", "tiny", "--out", str(out), "--learning_rates",
               "1e-4", "--num_samples", "4", "--lora", "true", *lora, *TINY_EVAL])
    assert rc == 2 and re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_the_early_lora_check_checks_the_targets_the_recipe_trains(tokenizer, tmp_path, capsys, monkeypatch):
    """subspace puts LoRA on its own --recipe.modules: a model without the default targets (Phi-3: qkv_proj,
    gate_up_proj) passes the check with modules it has, and fails it with modules it lacks."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from seamlm.errors import ModelLoadError

    d = tmp_path / "phi3"
    Phi3ForCausalLM(Phi3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)).save_pretrained(d)
    tokenizer.save_pretrained(d)

    def reached_the_load(*a, **k):
        raise ModelLoadError("the check passed: the model would load now")

    _patch_load_model(monkeypatch, reached_the_load)
    base = ["attack", "--model", str(d), "--label", "phi3", "--learning_rates", "1e-4", "--num_samples", "4",
            "--lora", "true", "--recipe", "subspace", *TINY_EVAL]
    assert main([*base, "--out", str(tmp_path / "a"), "--recipe.modules", "qkv_proj,o_proj"]) == 1
    assert "the check passed" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--recipe.modules", "q_proj"]) == 2
    assert re.search(r"lora_target_modules \['q_proj'\] are not modules of this model", capsys.readouterr().err)
    assert not (tmp_path / "b").exists()


def test_attack_without_a_label_keeps_its_files_under_out(tiny_model_dir, tmp_path, capsys):
    """The label defaults to the --model value, here an absolute path: its folders must not be joined to --out as
    a path (which would write the attack's logs into the model's own folder and then fail)."""
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    out = tmp_path / "att"
    rc = main(["attack", "--model", str(tiny_model_dir.resolve()), "--out", str(out), "--learning_rates", "1e-3",
               "--num_samples", "4", "--batch_size", "2", "--no-pre", *TINY_EVAL])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {str(tiny_model_dir.resolve())}
    assert (out / rows[0]["attack"]["loss_log"]).is_file() and len(list((out / "attacks").iterdir())) == 1


def test_options_are_never_abbreviated_nor_grid_values_ignored(tmp_path, capsys, monkeypatch):
    from seamlm.cli import build_parser

    args, extra = build_parser().parse_known_args(["demo", "--seed", "3"])
    assert args.seeds is None and extra == ["--seed", "3"]  # not --seeds 3: a DemoConfig key, passed through
    # --lr at its default value would have been silently ignored by the learning-rate grid
    rc = main(["attack", "--model", "m", "--out", str(tmp_path / "a"), "--lr", "2e-5"])
    assert rc == 2 and "--lr: one cell's value" in capsys.readouterr().err and not (tmp_path / "a").exists()
    # ... and so would `lr: 2e-5` (the default) or `seed: 0` in an attack config file
    (tmp_path / "attack.yaml").write_text("lr: 2.0e-5\nseed: 0\nbatch_size: 4\n")
    rc = main(["attack", "--model", "m", "--out", str(tmp_path / "a"), "--config", str(tmp_path / "attack.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "lr, seed is one cell's value" in err and "learning_rates, seeds (a list)" in err, err
    assert not (tmp_path / "a").exists()
    assert main(["judge", "train", "--typo", "3"]) == 2
    assert "unexpected arguments ['--typo', '3']" in capsys.readouterr().err
    assert main(["judge", "check"]) == 2 and "name the file of hand-labelled answers" in capsys.readouterr().err
    assert main(["judge", "train", "x.jsonl"]) == 2 and "takes no FILE" in capsys.readouterr().err
    assert main(["judge", "check", "x.jsonl", "--judge", "keyword", "--seed", "1"]) == 2
    assert "belong to the minilm judge" in capsys.readouterr().err
    assert main(["judge", "check", "x.jsonl", "--judge", "gpt-5"]) == 2 and "unknown judge" in capsys.readouterr().err
    import seamlm.evaluate.judges as judges

    with monkeypatch.context() as m:  # the file is read before the judge is trained (≈ 45 s)
        m.setattr(judges, "MiniLMJudge", lambda **_: pytest.fail("judge built before the file was read"))
        assert main(["judge", "check", "missing.jsonl"]) != 0
    assert "does not exist" in capsys.readouterr().err
    probe = Path(__file__).parent / "fixtures" / "judge_probe_real.jsonl"
    assert main(["judge", "check", str(probe), "--judge", "keyword"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["judge"] == "keyword-v4" and out["refusal"]["rows"] == 84 and out["harmful"]["rows"] == 26
    assert main(["judge", "check", str(probe), "--judge-model", "m"]) == 2
    assert "--judge-model belongs to a judge with a model" in capsys.readouterr().err


def test_eval_command_and_bad_eval_key(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out), *[a.replace("--eval.", "--") for a in TINY_EVAL]]) == 0
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["cell"] == "pre"
    # the same label on other data (another split seed) would share a report row with the first: refused
    before = (out / "results.jsonl").read_text()
    assert main(["eval", "--model", str(tiny_model_dir), "--out", str(out), "--data-seed", "1",
                 *[a.replace("--eval.", "--") for a in TINY_EVAL]]) == 1
    err = capsys.readouterr().err
    assert "already holds cell 'pre'" in err and "data:" in err
    assert (out / "results.jsonl").read_text() == before
    rc = main(["attack", "--model", str(tiny_model_dir), "--out", str(out), "--eval.bogus", "1"])
    assert rc == 2 and "unknown EvalConfig key(s) 'bogus'" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tiny_model_dir), "--out", str(out), "--trajectory_every", "5"])
    assert rc == 2 and "seamlm eval` runs none" in capsys.readouterr().err
    # eval/attack/sweep share a folder with each other (cell by cell), never with a demo, adaptive or rescore
    from seamlm.rescore import rescore
    from seamlm.runinfo import folder_lock

    again = ["eval", "--model", str(tiny_model_dir), "--out", str(out), *[a.replace("--eval.", "--") for a in TINY_EVAL]]
    with folder_lock(out, "demo"):
        assert main(again) == 2
        assert "is in use by another seamlm command (seamlm demo, pid" in capsys.readouterr().err
    with folder_lock(out, "attack", shared=True):
        assert main(again) == 0  # (its cell is there already)
        with pytest.raises(ConfigError, match=r"in use by another seamlm command \(seamlm attack, pid \d+"):
            rescore(out, EvalConfig(judge="keyword"))


def test_attack_checks_lm_eval_task_names_before_any_model_runs(tmp_path, capsys):
    """A misspelt lm-eval task stops the attack command at once: the model path does not even exist, so an error
    about the task (not the model) shows the check ran first."""
    pytest.importorskip("lm_eval")
    rc = main(["attack", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
               "--eval.lm_eval_tasks", "arc_easyy"])
    assert rc != 0 and "does not know the task(s) arc_easyy" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_single_process_commands_refuse_a_multi_process_launch(monkeypatch, capsys):
    from seamlm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["report", "nothing.jsonl", "--out", "nowhere"]) == 2
    assert "runs in one process" in capsys.readouterr().err


@pytest.mark.parametrize("env,match", [
    ({"ACCELERATE_USE_FSDP": "true"}, "asks for FSDP .*--shard_parameters true"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "asks for DeepSpeed"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision: fp16, which .*--compute_dtype"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "mixed_precision: bf16"),
])
def test_accelerate_options_seamlm_would_not_apply_are_refused(monkeypatch, tiny_model_dir, data_files, tmp_path,
                                                                capsys, env, match):
    """An accelerate config with its FSDP/DeepSpeed plugin or mixed precision is an error before the model loads,
    not a run that silently ignores it."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc = main(_defend_args(tiny_model_dir, data_files, tmp_path / "out", "--steps", "1"))
    assert rc == 2 and re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command,args,advice", [
    ("defend", ["--model", "m", "--out", "x"], "rerun with --resume"),
    ("attack", ["--model", "m", "--out", "x"], "rerun the same command: finished stages, cells and trials are kept"),
])
def test_interrupt_and_full_disk_say_how_to_continue_per_command(monkeypatch, capsys, command, args, advice):
    import errno

    import seamlm.cli as cli

    def interrupted(*a):
        raise KeyboardInterrupt

    def full_disk(*a):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/results.jsonl")

    for fail, rc in ((interrupted, 130), (full_disk, 1)):
        monkeypatch.setitem(cli.COMMANDS, command, (cli.COMMANDS[command][0], fail))
        assert main([command, *args]) == rc
        err = capsys.readouterr().err
        assert advice in err and ("--resume" in err) == (command == "defend")


@pytest.mark.parametrize("code,advice", [(errno.EPERM, "not permitted"), (errno.EACCES, "no permission"),
                                         (errno.EROFS, "read-only file system")])
def test_a_path_the_system_refuses_is_one_line_naming_it(monkeypatch, capsys, code, advice):
    """EPERM (an immutable file; macOS's protected folders) as well as EACCES/EROFS: the path and what to do."""
    import seamlm.cli as cli

    def refused(*a):
        raise OSError(code, os.strerror(code), "/protected/out/results.jsonl")

    monkeypatch.setitem(cli.COMMANDS, "eval", (cli.COMMANDS["eval"][0], refused))
    assert main(["eval", "--model", "m", "--out", "o"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("seamlm eval: error: /protected/out/results.jsonl: ") and advice in err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv,match", [
    (["sweep", "--model", "m", "--out", "o", "--trial", "2"], "unknown sweep key(s) 'trial' (did you mean 'trials'?)"),
    (["demo", "--out", "o", "--defense_unlearn_loss", "foo"], "config key 'defense_unlearn_loss' must be one of"),
    (["attack", "--model", "m", "--out", "o", "--recipe.per_tensor", "true"],
     "unknown RecipeKnobs key(s) 'per_tensor'. It takes no keys."),
    (["defend", "--model", "m", "--out", "o", "--output_dir", "p"], "give the output folder as --out"),
    (["defend", "--model", "m", "--out", "o", "--seed", "100000000000000"], "seed must be in 0 … 4294967295"),
    (["attack", "--model", "m", "--out", "o", "--seeds", "0,-1"], "seeds must be in 0 … 4294967295"),
    (["demo", "--out", "o", "--seeds", "0,4294967296"], "--seeds must be in 0 … 4294967295"),
])
def test_config_errors_name_the_option_the_user_typed(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,match", [
    (["defend", "--model", "a", "--model", "b", "--out", "o"], "argument --model: given twice (the second: 'b')"),
    (["eval", "--model", "m", "--out", "o", "--out=p"], "argument --out: given twice (the second: 'p')"),
    (["data", "build", "offline-default", "--out", "o", "--seed", "1", "--seed", "2"], "argument --seed: given twice"),
])
def test_an_option_given_twice_is_a_usage_error(argv, match, tmp_path, capsys, monkeypatch):
    """argparse would keep the later value silently: a pasted command with a second --out or --harmful is a mistake."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,match", [
    (["defend", "--model", "m", "--out", "o", "--data-seed", "-1"], "argument --data-seed/--data_seed: a seed must be in"),
    (["data", "build", "offline-default", "--out", "o", "--seed", "x"], "argument --seed: a seed is a whole number, got 'x'"),
    (["judge", "train", "--seed", "4294967296"], "argument --seed: a seed must be in 0 … 4294967295"),
])
def test_seed_options_out_of_range_are_usage_errors(argv, match, tmp_path, capsys, monkeypatch):
    """A seed numpy or Optuna would reject (or torch overflow on, mid-run) stops the command line at once."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sweep_lists_as_fixed_only_the_keys_it_does_not_search(capsys):
    from seamlm.cli import SEARCHED

    assert main(["sweep", "--model", "m", "--out", "o", "--trial", "2"]) == 2
    fixed = capsys.readouterr().err.split("fixed fine-tuning keys: ")[1]
    assert "max_length" in fixed and not {k.strip() for k in fixed.split(",")} & set(SEARCHED)


@pytest.mark.parametrize("args", [
    ["defend", "--model", "m", "--data", "offline-default"],
    ["eval", "--model", "m", "--judge", "keyword"],
    ["attack", "--model", "m"],
    ["sweep", "--model", "m"],
    ["demo"],
    ["adaptive"],
    ["report", "results.jsonl"],
    ["data", "build", "offline-default"],
    ["data", "distill", "--model", "m", "--prompts", "p.jsonl"],
    ["paired", "run"],
])
def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path, capsys, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        assert main([*args, "--out", empty]) == 2
        err = capsys.readouterr().err
        assert f"config error: --out is empty ({empty!r}): it would write into the current folder" in err, err
    assert list(tmp_path.iterdir()) == []
