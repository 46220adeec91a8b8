"""A shrunken demo end to end on a tiny model: every stage, resumability, and a report built from the results."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from seamlm.errors import ConfigError
from seamlm.pipeline import DemoConfig, run_demo
from seamlm.results import ResultStore
from tests.conftest import make_model, make_tokenizer


def test_shrunken_demo_end_to_end_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    cfg = DemoConfig(model=str(tiny_model_dir), align_steps=2, align_batch_size=2, defense_steps=2, defense_batch_size=2,
                     max_length=48, attack_lrs=(1e-4, 1e-3), attack_samples=4, hs_prompts=2, zs_limit=2,
                     zs_tasks=("arc_easy",), fs=False, judge="keyword", attack_lora=True, trajectory_every=1)
    out = tmp_path / "demo"
    report = run_demo(out, cfg)
    assert (out / "models" / "aligned" / "model.safetensors").is_file()
    assert (out / "models" / "seam" / "model" / "model.safetensors").is_file()
    assert not (out / "models" / "seam" / "checkpoints").exists()  # the finished stage's resume points are freed
    assert (out / "models" / "seam" / "log.jsonl").is_file()
    seam_run = json.loads((out / "models" / "seam" / "model" / "seamlm_run.json").read_text())
    assert seam_run["warmup_steps"] == 1 and seam_run["base_identity"].startswith("sha256:")  # ceil(0.1 × 2)
    rows = ResultStore(out / "results.jsonl").rows()
    cells = {(r.model, r.cell) for r in rows}
    assert {("raw", "pre"), ("aligned", "pre"), ("seam", "pre")} <= cells
    assert sum(1 for m, c in cells if m == "seam" and c != "pre") == 3  # two full-parameter lrs + one LoRA
    md = report.read_text()
    assert md.count("| seam |") >= 3 and (out / "report" / "hs_vs_lr.png").is_file()
    assert (out / "report" / "results.csv").read_text().count("\n") == len(rows) + 1  # a header, then every row
    values = {f"{abs(r.value):.{d}f}" for r in rows for d in (1, 2, 3)}  # the regex below drops signs
    assert "gradient coupling" in md
    for line in md.splitlines():
        if line.startswith(("| raw", "| aligned", "| seam")):
            cols = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cols) == 7 and cols[2].startswith("sft:"):
                # worst-case table: the attack's settings and the ZS change are not result values; HS, ZS, ppl are
                line = " ".join([cols[3], cols[4].split(" (")[0], cols[5]])
            for num in re.findall(r"\d+\.\d+", line):
                assert num in values, (num, line)
    _check_main_table_cell_by_cell(md, rows)
    from seamlm.verdict import check_bar

    bar = md.split("### Does SEAM clear the bar?")[1].split("\n\n")[1]  # the heading's rest, then the table
    assert len(bar.splitlines()) == 2 + len(check_bar(rows)), bar
    assert "not comparable" not in bar  # the demo measures every label alike
    for line in bar.splitlines()[2:]:
        measured = line.strip("|").split("|")[1]
        assert re.findall(r"\d+\.\d+", measured) or line.rstrip().endswith("| not measured |"), line
        for num in re.findall(r"\d+\.\d+", measured):
            assert num in values, (num, line)

    # a rerun skips every stage: nothing is trained or evaluated again
    import seamlm.pipeline as pipeline

    def fail(*a, **k):
        raise AssertionError("a finished stage ran again")

    for name in ("RefusalSFT", "SEAMTrainer", "load_model"):
        monkeypatch.setattr(pipeline, name, fail)
    before = (out / "results.jsonl").read_text()
    first = json.loads((out / "timings.json").read_text())
    assert list(first) == ["judge", "data", "align", "defend", "evaluate", "attack", "report", "total"]
    run_demo(out, cfg)
    assert (out / "results.jsonl").read_text() == before
    # the stage times add up over invocations: a resumed demo reports what the stages cost when they ran
    again = json.loads((out / "timings.json").read_text())
    assert again["align"] >= first["align"] > 0 and again["total"] >= first["total"]
    assert len((out / "timings.jsonl").read_text().splitlines()) == 14  # two invocations of seven stages
    with pytest.raises(ConfigError, match="other settings \\(defense_steps: 2 → 3\\).*give its settings "
                                          "\\(--defense_steps 2\\)"):
        run_demo(out, cfg.replace(defense_steps=3))
    assert "attack_trajectory.png" in md and "benign perplexity during the attack, before its first step -> its highest" in md


def _check_main_table_cell_by_cell(md: str, rows) -> None:
    """The paper-style table: each cell is its own (model, cell)'s HS / ZS, not merely some value of the file."""
    from seamlm.report import _cells, _pm

    values = {(r.model, r.cell, r.metric): r.value for r in rows}
    table = md.split("### HS % (judge")[1].split("\n\n")[1].splitlines()
    cells = [c for c, _ in _cells(rows)]
    assert len(table) == 2 + len({r.model for r in rows})
    for line in table[2:]:
        model, *got = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(got) == len(cells), line
        for cell, text in zip(cells, got, strict=True):
            hs, zs = (_pm(values.get((model, cell, k)), values.get((model, cell, f"{k}_se"))) for k in ("hs", "zs_mean"))
            assert text.split(" (")[0] == f"{hs} / {zs}", (model, cell, text)
            assert ("±" in text) == ((model, cell, "hs_se") in values), text


def test_demo_reuses_a_baseline_for_other_defense_settings(tiny_model_dir, tmp_path, monkeypatch):
    import seamlm.pipeline as pipeline

    cfg = DemoConfig(model=str(tiny_model_dir), align_steps=2, align_batch_size=2, defense_steps=2, defense_batch_size=2,
                     max_length=48, attack_lrs=(1e-3,), attack_samples=4, hs_prompts=2, zs_limit=2,
                     zs_tasks=("arc_easy",), fs=False, judge="keyword")
    base = tmp_path / "base"
    run_demo(base, cfg)
    base_rows = ResultStore(base / "results.jsonl").rows()

    def fail(*a, **k):
        raise AssertionError("the baseline was re-aligned")

    monkeypatch.setattr(pipeline, "RefusalSFT", fail)
    trial = tmp_path / "trial"
    run_demo(trial, cfg.replace(defense_steps=3, baseline_from=str(base)))
    assert not (trial / "models" / "aligned").exists() and not (trial / "data").exists()
    rows = ResultStore(trial / "results.jsonl").rows()
    copied = [(r.model, r.cell, r.metric, r.value) for r in rows if r.model in ("raw", "aligned")]
    assert copied == [(r.model, r.cell, r.metric, r.value) for r in base_rows if r.model in ("raw", "aligned")]
    assert {r.cell for r in rows if r.model == "seam"} == {r.cell for r in base_rows if r.model == "seam"}
    seam_log = (trial / "models" / "seam" / "log.jsonl").read_text().splitlines()
    assert len(seam_log) == 3
    # adaptive attacks on that demo find its aligned model and data in the baseline
    from seamlm.adaptive import AdaptiveConfig, _demo

    _, paths = _demo(AdaptiveConfig(demo_dir=str(trial)))
    assert paths["aligned"] == base / "models" / "aligned" and paths["data"] == base / "data"
    assert paths["seam"] == trial / "models" / "seam" / "model"
    with pytest.raises(ConfigError, match="attack_samples"):
        run_demo(tmp_path / "bad", cfg.replace(attack_samples=5, baseline_from=str(base)))
    # the copied attack rows' loss curves are the baseline's, found from the new run's folder (its report plots them)
    logs = {r.attack["loss_log"] for r in rows if r.model == "aligned" and r.cell != "pre"}
    assert logs and all((trial / p).resolve() == (base / q).resolve() for p, q in zip(
        sorted(logs), sorted({r.attack["loss_log"] for r in base_rows if r.model == "aligned" and r.cell != "pre"}),
        strict=True))
    assert all((trial / p).is_file() for p in logs)
    # a baseline that itself reused one: the error names the demo that holds the aligned model
    with pytest.raises(ConfigError, match=f"give baseline_from={base}"):
        run_demo(tmp_path / "chain", cfg.replace(defense_steps=4, baseline_from=str(trial)))
    # the baseline's aligned model retrained since (other weights, same settings): the trial's SEAM model, trained
    # from the old one, is not set beside it
    from seamlm.models import load_model, save_model, saved_run_config

    aligned = base / "models" / "aligned"
    model, tok = load_model(str(aligned))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_model(model, tok, aligned, {k: v for k, v in saved_run_config(aligned).items() if k != "weights_sha256"})
    with pytest.raises(ConfigError, match="started from another aligned model than .* holds now"):
        run_demo(trial, cfg.replace(defense_steps=3, baseline_from=str(base)))
    with pytest.raises(ConfigError, match="started from another aligned model.*redo the demo"):
        _demo(AdaptiveConfig(demo_dir=str(trial)))  # nor do adaptive attacks set the two side by side


@pytest.mark.slow
def test_demo_over_several_seeds_reports_across_them(tiny_model_dir, tmp_path, capsys):
    from seamlm.cli import main

    args = ["demo", "--out", str(tmp_path / "d"), "--seeds", "0,1", "--model", str(tiny_model_dir),
            "--align_steps", "2", "--align_batch_size", "2", "--defense_steps", "2", "--defense_batch_size", "2",
            "--max_length", "48", "--attack_lrs", "1e-3", "--attack_samples", "4", "--hs_prompts", "2",
            "--zs_limit", "2", "--zs_tasks", "arc_easy", "--fs", "false", "--judge", "keyword"]
    assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "d"
    manifests = [json.loads((out / f"seed-{s}" / "data" / "manifest.json").read_text()) for s in (0, 1)]
    assert [m["seed"] for m in manifests] == [0, 1]  # other splits
    md = (out / "report" / "report.md").read_text()
    assert "### HS %: mean ± sd over 2 runs" in md and "| met in |" in md
    assert {ln.split(",")[0] for ln in (out / "report" / "results.csv").read_text().splitlines()[1:]} == {
        str(out / f"seed-{s}" / "results.jsonl") for s in (0, 1)}
    for s in (0, 1):
        assert f"seed-{s}/results.jsonl" in md
    assert main([*args, "--data_seed", "3"]) == 2
    assert "either as --seeds or as --data_seed" in capsys.readouterr().err
    assert main([*args[:4], "0,0", *args[5:]]) == 2


def test_fresh_never_empties_a_folder_that_holds_no_demo(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no demo run"):
        run_demo(mine, DemoConfig(model="smollm2-135m-instruct"), fresh=True)
    assert (mine / "chapter1.txt").read_text() == "mine"
    # what a demo stopped before its config was written leaves (its lock, its clock's line) is no user's data
    from seamlm.pipeline import check_demo_folder
    from seamlm.runinfo import LOCK_FILE

    left = tmp_path / "stopped"
    left.mkdir()
    (left / LOCK_FILE).write_text("")
    (left / "timings.jsonl").write_text('{"stage": "interrupted", "seconds": 1.0}\n')
    check_demo_folder(left, DemoConfig(model="smollm2-135m-instruct"), fresh=True)


def test_a_demo_killed_before_writing_anything_starts_over_with_new_settings(tmp_path, monkeypatch, caplog):
    import seamlm.pipeline as pipeline

    out = tmp_path / "d"
    out.mkdir()
    (out / "demo_config.json").write_text(json.dumps(DemoConfig(hs_prompts=3).to_dict()))
    monkeypatch.setattr(pipeline, "StageClock", lambda *a: (_ for _ in ()).throw(RuntimeError("checks passed")))
    with pytest.raises(RuntimeError, match="checks passed"), caplog.at_level("WARNING"):
        run_demo(out, DemoConfig(hs_prompts=4))
    assert "wrote nothing yet; starting over" in caplog.text
    (out / "data").mkdir()  # a stage began: the settings are pinned
    with pytest.raises(ConfigError, match="hs_prompts: 3 → 4"):
        run_demo(out, DemoConfig(hs_prompts=4))


def test_seeds_and_single_demos_do_not_share_a_folder_and_every_seed_is_checked_first(tmp_path, monkeypatch):
    import seamlm.pipeline as pipeline
    from seamlm.pipeline import run_demo_seeds

    single = tmp_path / "single"
    single.mkdir()
    (single / "demo_config.json").write_text(json.dumps(DemoConfig().to_dict()))
    with pytest.raises(ConfigError, match="holds a single demo run"):
        run_demo_seeds(single, DemoConfig(), [0, 1])
    # seed 1's folder holds a run with other settings: refused before seed 0 trains anything
    many = tmp_path / "many"
    (many / "seed-1" / "data").mkdir(parents=True)
    (many / "seed-1" / "demo_config.json").write_text(json.dumps(DemoConfig(data_seed=1, hs_prompts=3).to_dict()))
    monkeypatch.setattr(pipeline, "run_demo", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(ConfigError, match="seed-1 holds a demo run with other settings"):
        run_demo_seeds(many, DemoConfig(), [0, 1])
    (many / "seed-1" / "demo_config.json").write_text(json.dumps(DemoConfig(data_seed=1).to_dict()))
    with pytest.raises(AssertionError, match="ran"):
        run_demo_seeds(many, DemoConfig(), [0, 1])
    with pytest.raises(ConfigError, match="holds the demos of several data seeds"):
        run_demo(many, DemoConfig())
    (many / "seeds.json").unlink()  # a seeds folder written before the marker existed
    with pytest.raises(ConfigError, match="holds the demos of several data seeds"):
        run_demo(many, DemoConfig())


def test_the_settings_a_refused_demo_suggests_paste_back_as_options():
    import shlex

    from seamlm.config import parse_overrides
    from seamlm.pipeline import _cli_value

    then = DemoConfig(baseline_from="", zs_tasks=("arc_easy", "sciq"), judge_model="")
    line = " ".join(f"--{k} {_cli_value(getattr(then, k))}" for k in ("baseline_from", "zs_tasks", "judge_model"))
    assert DemoConfig.from_dict(parse_overrides(shlex.split(line))) == then


def test_what_a_job_has_left_is_its_last_invocations_plan_less_its_laps(tmp_path):
    """A resumed invocation may plan otherwise (an adaptive run resumed without its sweeps, or with them again): only
    the last plan and that invocation's laps say what is left."""
    from seamlm.runinfo import StageClock

    path = tmp_path / "timings.jsonl"
    assert StageClock.left(path) is None  # no plan recorded (another job, or an older seamlm): unknown

    def invocation(name: str, plan: list[str], laps: list[str]) -> None:
        clock = StageClock(path)
        clock.invocation = name
        clock.plan(plan)
        for stage in laps:
            clock.lap(stage)

    invocation("1", ["pre", "recipe_sft", "sweep_seam"], ["pre"])  # killed in the recipe
    assert StageClock.left(path) == ["recipe_sft", "sweep_seam"]
    invocation("2", ["pre", "recipe_sft"], ["pre", "recipe_sft"])  # resumed without the sweep, finished
    assert StageClock.left(path) == []
    invocation("3", ["pre", "recipe_sft", "sweep_seam"], ["pre", "recipe_sft"])  # the sweep asked again, killed
    assert StageClock.left(path) == ["sweep_seam"]
    assert list(StageClock.totals(path)) == ["pre", "recipe_sft", "total"]  # plans are no stages


def test_stage_clock_sums_stages_over_invocations(tmp_path):
    from seamlm.runinfo import StageClock

    path = tmp_path / "timings.jsonl"
    path.write_text(json.dumps({"time": "x", "pre_s": 99.0}) + "\n")  # an older seamlm's line: not a stage
    first = StageClock(path)
    time.sleep(0.05)
    a1, b1 = first.lap("a"), first.lap("b")
    assert a1 >= 0.05 > b1
    a2 = StageClock(path).lap("a")  # a resumed invocation that only redid stage a
    totals = StageClock.totals(path)
    assert list(totals) == ["a", "b", "total"]
    assert totals["a"] == pytest.approx(a1 + a2, abs=0.01) and totals["b"] == pytest.approx(b1, abs=0.01)
    assert totals["total"] == pytest.approx(a1 + a2 + b1, abs=0.02)
    assert StageClock.totals(tmp_path / "none.jsonl") == {"total": 0.0}
    with path.open("a") as f:
        f.write('{"invocation": "x", "stage": "b", "sec')  # a kill mid-write of a lap
    b2 = StageClock(path).lap("b")
    assert StageClock.totals(path)["b"] == pytest.approx(b1 + b2, abs=0.01)
    # a stage stopped by Ctrl-C or an error: its seconds are charged to "interrupted", not lost
    clock = StageClock(path)
    with pytest.raises(KeyboardInterrupt), clock.charging_interruptions():
        clock.lap("c")
        time.sleep(0.05)
        raise KeyboardInterrupt
    assert StageClock.totals(path)["interrupted"] >= 0.05


@pytest.mark.parametrize("bad,match", [
    ({"defense_unlearn_loss": "logit-lens"}, "must be one of \\['logit_lens', 'final_layer'\\]"),
    ({"zs_tasks": "arc_easyy"}, "unknown zero-shot task\\(s\\) arc_easyy"),
    ({"zs_tasks": "arc_easy,piqa"}, "zs_tasks \\['piqa'\\] feed the offline-default bundle's training data"),
    ({"judge": "gpt-judge"}, "unknown judge 'gpt-judge'"),
    ({"fs_train": 0}, "fs_train, fs_test and fs_steps must be >= 1"),
    ({"align_steps": 0}, "align_steps must be >= 1"),
    ({"attack_lrs": "0"}, "learning rates > 0"),
])
def test_demo_settings_of_later_stages_fail_before_the_first(bad, match, tmp_path):
    """A value only a later stage reads (SEAM, evaluation, attack) is refused when the config is built — before
    alignment runs and before demo_config.json pins the output folder to it."""
    from seamlm.cli import main

    with pytest.raises(ConfigError, match=match):
        DemoConfig.from_dict(bad)
    key, value = next(iter(bad.items()))
    assert main(["demo", "--out", str(tmp_path / "d"), f"--{key}", str(value)]) == 2
    assert not (tmp_path / "d" / "demo_config.json").exists()


def test_a_mistyped_model_fails_before_the_demo_writes_anything(tmp_path, capsys):
    from seamlm.cli import main

    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "nope")]) != 0
    assert "nope does not exist" in capsys.readouterr().err and not out.exists()
    # --fresh over a finished demo would retrain from --model: a typo there must not empty the folder first
    (out / "models" / "aligned").mkdir(parents=True)
    (out / "models" / "aligned" / "model.safetensors").write_bytes(b"x")
    (out / "models" / "aligned" / "seamlm_run.json").write_text("{}")
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "nope"), "--fresh"]) != 0
    assert "nope does not exist" in capsys.readouterr().err and (out / "models" / "aligned" / "seamlm_run.json").is_file()


def test_a_refused_demo_leaves_its_folder_as_it_was(tmp_path, capsys):
    """A check that fails (here a --baseline_from that is no demo) writes no demo_config.json that would pin the
    folder to the refused settings, and --fresh deletes nothing before the checks pass."""
    from seamlm.cli import main

    out = tmp_path / "d"
    assert main(["demo", "--out", str(out), "--baseline_from", str(tmp_path / "nowhere")]) == 2
    assert "not a demo directory" in capsys.readouterr().err
    assert not (out / "demo_config.json").exists()
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's file")
    assert main(["demo", "--out", str(out), "--fresh", "--baseline_from", str(tmp_path / "nowhere")]) == 2
    assert (out / "keep.txt").is_file() and not (out / "demo_config.json").exists()


def test_a_baseline_inside_out_is_refused_before_anything_is_deleted(tmp_path):
    out = tmp_path / "run"
    (out / "baseline").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    (out / "demo_config.json").write_text("{}")  # a demo folder: --fresh's own check passes
    for base in (out, out / "baseline"):
        with pytest.raises(ConfigError, match="is --out itself or inside it"):
            run_demo(out, DemoConfig(baseline_from=str(base)), fresh=True)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="is inside baseline_from"):
        run_demo(out / "baseline" / "sub", DemoConfig(baseline_from=str(out)), fresh=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_finished_stage_trained_with_another_configuration_is_not_reused(tmp_path, caplog):
    # demo_config.json pins the demo's own settings; a stage's constants and config defaults can change with seamlm
    from seamlm.finetune import LOOP_VERSION
    from seamlm.pipeline import _check_stage

    cfg = DemoConfig().align_config()
    make_tokenizer().save_pretrained(tmp_path)
    make_model(8).config.save_pretrained(tmp_path)
    info = {"stage": "align", "config": cfg.to_dict(), "loop": LOOP_VERSION}
    (tmp_path / "seamlm_run.json").write_text(json.dumps(info))
    _check_stage(tmp_path, "config", cfg, "align")  # the same: reused
    (tmp_path / "seamlm_run.json").write_text(json.dumps({**info, "config": {**cfg.to_dict(), "weight_decay": 0.1}}))
    with pytest.raises(ConfigError, match=r"weight_decay: 0.1 → 0.0.*--fresh"):
        _check_stage(tmp_path, "config", cfg, "align")
    (tmp_path / "seamlm_run.json").write_text(json.dumps({**info, "loop": LOOP_VERSION - 1}))
    with pytest.raises(ConfigError, match="training loop version"):
        _check_stage(tmp_path, "config", cfg, "align")
    # aligned before seamlm recorded its loop's version: reused, but not silently
    (tmp_path / "seamlm_run.json").write_text(json.dumps({k: v for k, v in info.items() if k != "loop"}))
    with caplog.at_level("WARNING"):
        _check_stage(tmp_path, "config", cfg, "align")
    assert "did not record its training loop's version: reused unverified" in caplog.text
    # a SEAM model that warmed up otherwise than this seamlm would (the rounding changed on 2026-11-27)
    seam_cfg = DemoConfig(defense_steps=4).defense_config("x")  # ceil(0.4) = 1 warm-up step, int(0.4) = 0
    seam_info = {"stage": "defend", "defense_config": seam_cfg.to_dict()}
    for recorded, outcome in ((1, None), (0, "warm-up steps: 0 → 1"), ("absent", "does not record its warm-up")):
        record = seam_info if recorded == "absent" else {**seam_info, "warmup_steps": recorded}
        (tmp_path / "seamlm_run.json").write_text(json.dumps(record))
        if outcome and "→" in outcome:
            with pytest.raises(ConfigError, match=outcome):
                _check_stage(tmp_path, "defense_config", seam_cfg, "defend", ignore=("output_dir",))
        else:
            _check_stage(tmp_path, "defense_config", seam_cfg, "defend", ignore=("output_dir",))
    assert "does not record its warm-up (older seamlm): made before 2026-11-27 it warmed up for 0 steps" in caplog.text


def test_a_stale_baseline_alignment_is_refused_before_fresh_deletes_anything(tmp_path):
    # a demo reusing a baseline whose aligned model another configuration trained: --fresh on this demo would not
    # help (the model lives in the baseline), so the message says to redo the baseline, and nothing is deleted
    from seamlm.finetune import LOOP_VERSION

    base, out = tmp_path / "base", tmp_path / "run"
    make_tokenizer().save_pretrained(base / "models" / "aligned")
    make_model(8).config.save_pretrained(base / "models" / "aligned")
    (base / "demo_config.json").write_text(json.dumps(DemoConfig().to_dict()))
    stale = {**DemoConfig().align_config().to_dict(), "weight_decay": 0.1}
    (base / "models" / "aligned" / "seamlm_run.json").write_text(json.dumps({"config": stale, "loop": LOOP_VERSION}))
    out.mkdir()
    (out / "demo_config.json").write_text(json.dumps(DemoConfig(baseline_from=str(base)).to_dict()))
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"weight_decay.*redo the baseline first \(seamlm demo --out .*base --fresh\)"):
        run_demo(out, DemoConfig(baseline_from=str(base), defense_steps=3), fresh=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_stage_without_chat_template_trained_in_the_old_prompt_format_is_not_reused(tmp_path):
    """Prompts of a model without a chat template changed with PROMPT_FORMAT_VERSION 2 ("Answer:" + the tokenizer's
    join); a model with one formats as before, so its stages stay reusable whatever they recorded."""
    from seamlm.finetune import LOOP_VERSION
    from seamlm.models import PROMPT_FORMAT_VERSION
    from seamlm.pipeline import _check_stage

    cfg = DemoConfig().align_config()
    info = {"stage": "align", "config": cfg.to_dict(), "loop": LOOP_VERSION}  # saved before formats were recorded
    plain, chat = tmp_path / "plain", tmp_path / "chat"
    for d, template in ((plain, False), (chat, True)):
        make_tokenizer(chat_template=template).save_pretrained(d)
        make_model(8).config.save_pretrained(d)
        (d / "seamlm_run.json").write_text(json.dumps(info))
    _check_stage(chat, "config", cfg, "align")
    with pytest.raises(ConfigError, match=r"prompt format version .*1 → 2.*--fresh"):
        _check_stage(plain, "config", cfg, "align")
    (plain / "seamlm_run.json").write_text(json.dumps({**info, "prompt_format": PROMPT_FORMAT_VERSION}))
    _check_stage(plain, "config", cfg, "align")


def test_one_command_at_a_time_on_a_folder(tmp_path):
    """A second demo (or rescore, adaptive) on a folder another one is using is refused, naming the holder; the
    lock goes with the command."""
    from seamlm.runinfo import LOCK_FILE, folder_lock

    with folder_lock(tmp_path / "d", "demo"):
        with pytest.raises(ConfigError, match=r"d is in use by another seamlm command \(seamlm demo, pid \d+"):
            run_demo(tmp_path / "d", DemoConfig())
        from seamlm.rescore import rescore

        (tmp_path / "d" / "results.jsonl").write_text("")
        with pytest.raises(ConfigError, match="in use by another seamlm command"):
            rescore(tmp_path / "d", DemoConfig().eval_config())
    with folder_lock(tmp_path / "d", "rescore"):  # released
        pass
    assert (tmp_path / "d" / LOCK_FILE).is_file()


def test_a_failed_command_removes_the_folder_it_made_only_while_no_other_command_holds_it(tmp_path):
    """(Locks of two HolderLocks in one process conflict as two processes' would: flock is per open file.)"""
    from seamlm.locks import HolderLock
    from seamlm.runinfo import LOCK_FILE, folder_lock

    # alone: the folder it made goes with it
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "alone", "defend"):
        raise RuntimeError("the data check failed")
    assert not (tmp_path / "alone").exists()
    (tmp_path / "there").mkdir()
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "there", "defend"):  # a folder there before stays
        raise RuntimeError
    assert (tmp_path / "there").is_dir()
    other = HolderLock(tmp_path / "shared" / LOCK_FILE, "eval")
    # an eval that began beside the failing attack keeps the folder and its lock
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "shared", "attack", shared=True):
        assert other.acquire(shared=True)
        raise RuntimeError
    assert (tmp_path / "shared" / LOCK_FILE).is_file()
    # so an exclusive command is still refused
    with pytest.raises(ConfigError, match=r"shared is in use by another seamlm command \(seamlm eval"), \
            folder_lock(tmp_path / "shared", "demo"):
        pass
    other.release()


def test_a_process_waiting_on_a_lock_file_its_holder_removed_locks_the_new_one(tmp_path, monkeypatch):
    import threading

    import seamlm.locks
    from seamlm.locks import HolderLock

    waiting, real_lock = threading.Event(), seamlm.locks.lock_open_file

    def lock_and_say(fh, where, *, wait, shared=False):
        if wait:
            waiting.set()  # the file is open: the waiter is about to block on it
        return real_lock(fh, where, wait=wait, shared=shared)

    monkeypatch.setattr(seamlm.locks, "lock_open_file", lock_and_say)

    path = tmp_path / "d" / ".lock"
    first, second = HolderLock(path, "attack"), HolderLock(path, "eval")
    seen = []
    check = second._is_the_file_at_path
    second._is_the_file_at_path = lambda fh: seen.append(check(fh)) or seen[-1]
    assert first.acquire()
    waiter = threading.Thread(target=second.acquire, kwargs={"wait": True})
    waiter.start()  # blocks on the file the first holds
    assert waiting.wait(timeout=10)
    assert first.discard()  # (the waiter may have made the next file already)
    waiter.join(timeout=10)
    # it locked the removed file first, saw it was no longer the one at the path, and locked the new one
    assert not waiter.is_alive() and path.is_file() and seen == [False, True]
    assert not HolderLock(path, "demo").acquire()  # the second holds the file now at the path
    second.release()


def test_a_file_system_without_locks_or_a_system_without_fcntl_runs_unlocked(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import sys

    from seamlm.runinfo import folder_lock

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with folder_lock(tmp_path / "nfs", "demo"):
        assert (tmp_path / "nfs").is_dir()
    assert "cannot lock files (No locks available): not locked" in caplog.text
    monkeypatch.setitem(sys.modules, "fcntl", None)  # not POSIX: the folder is still made
    with folder_lock(tmp_path / "win", "demo"):
        assert (tmp_path / "win").is_dir()


def test_a_relative_baseline_is_found_again_from_another_folder(tmp_path, monkeypatch):
    """`seamlm demo --out trial --baseline_from base` started in tmp_path, resumed from elsewhere: the baseline is
    the one beside the demo, as rescore and adaptive find it too."""
    from seamlm.pipeline import baseline_folder, demo_paths

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "demo_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert baseline_folder(Path("trial"), "base") == Path("base")
    monkeypatch.chdir(tmp_path.parent)
    trial = tmp_path / "trial"
    assert baseline_folder(trial, "base") == tmp_path / "base"
    assert demo_paths(trial, DemoConfig(baseline_from="base"))["aligned"] == tmp_path / "base" / "models" / "aligned"
    assert baseline_folder(trial, "nowhere") == Path("nowhere")  # not found: as given, for the error to name


def test_a_demo_asked_for_another_judge_is_pointed_to_rescore(tmp_path):
    """A rescored baseline (or a changed --judge) needs no rerun: the error names the rescore command."""
    from seamlm.pipeline import check_demo_folder

    out = tmp_path / "d"
    out.mkdir()
    (out / "demo_config.json").write_text(json.dumps(DemoConfig(judge="keyword").to_dict()))
    (out / "results.jsonl").write_text("")
    with pytest.raises(ConfigError, match=rf"Only the judge differs: `seamlm rescore {re.escape(str(out))} --judge minilm`"):
        check_demo_folder(out, DemoConfig(judge="minilm"), fresh=False)
    with pytest.raises(ConfigError) as other:
        check_demo_folder(out, DemoConfig(judge="minilm", align_steps=3), fresh=False)
    assert "rescore" not in str(other.value)
