"""Command line of the adaptive attacks: recipes on `seamlm attack`, `seamlm sweep`, `seamlm adaptive`, report bounds."""

import json

import pytest

from seamlm.cli import main
from tests.test_cli import TINY_EVAL


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_attack_with_a_recipe_and_its_knobs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "att"
    rc = main(["attack", "--model", str(tiny_model_dir), "--label", "tiny", "--out", str(out), "--no-pre",
               "--recipe", "anchored", "--recipe.anchor_weight", "0.5", "--learning_rates", "1e-3",
               "--num_samples", "4", "--batch_size", "2", "--max_length", "64", *TINY_EVAL])
    assert rc == 0, capsys.readouterr().err
    rows = _rows(out / "results.jsonl")
    assert {r["cell"].split("-")[0] for r in rows} == {"anchored"}
    assert rows[0]["attack"]["knobs"] == {"anchor_weight": 0.5, "poison_ratio": 1.0}
    log = _rows(out / "attacks" / "tiny" / rows[0]["cell"] / "loss.jsonl")
    assert all({"harmful_ce", "benign_ce"} <= set(r) for r in log)


@pytest.mark.parametrize("args,message", [
    (["--recipe", "pcgard"], "unknown attack recipe 'pcgard'"),
    (["--recipe", "pcgrad", "--recipe.per_layer", "true"], "unknown SurgeryKnobs key(s) 'per_layer'"),
    (["--recipe", "anchored", "--recipe.poison_ratio", "1.5"], "poison_ratio must be in (0, 1]"),
])
def test_bad_recipe_names_and_knobs(tiny_model_dir, tmp_path, capsys, args, message):
    rc = main(["attack", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_list_recipes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["attack", "--list-recipes"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(name in out for name in ("sft", "anchored", "pcgrad", "benign_first", "subspace", "template", "ablation"))


def test_sweep_command_and_its_errors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    base = ["sweep", "--model", str(tiny_model_dir), "--label", "tiny", "--out", str(out), *TINY_EVAL]
    assert main([*base, "--lr", "1e-4"]) == 2
    assert "are searched by the sweep" in capsys.readouterr().err
    assert main([*base, "--recipes", "sft,template", "--trials", "2", "--batch_sizes", "2", "--num_samples", "4",
                 "--max_length", "64"]) == 0, capsys.readouterr().err
    assert "sweep 'tiny': 2 trials" in capsys.readouterr().out
    cells = {r["cell"] for r in _rows(out / "results.jsonl")}
    assert "pre" in cells and sum(c.startswith("sweep-") for c in cells) == 2
    assert (out / "sweep.db").is_file() and (out / "sweep_trials.tiny.csv").is_file()
    # a study resumed with other evaluation settings fails before the pre-attack evaluation spends its minutes
    before = (out / "results.jsonl").read_text()
    longer = list(base)
    longer[longer.index("--eval.max_new_tokens") + 1] = "5"
    assert main([*longer, "--recipes", "sft,template", "--trials", "3", "--batch_sizes", "2", "--num_samples", "4",
                 "--max_length", "64"]) == 2
    assert "was run with other eval settings (eval.max_new_tokens: 4 → 5); use another --out" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == before
    assert main(["report", str(out / "results.jsonl"), "--out", str(out / "rep"), "--eps", "5,10"]) == 0
    assert "| tiny | 10 |" in (out / "rep" / "report.md").read_text()
    assert main(["report", str(out / "results.jsonl"), "--out", str(out / "rep"), "--eps", "five"]) == 2
    for bad in (["--eps", "5,nan"], ["--ppl-factor", "nan"]):  # a NaN bound would leave every trial out, silently
        capsys.readouterr()
        assert main(["report", str(out / "results.jsonl"), "--out", str(out / "rep"), *bad]) == 2
        assert "--ppl-factor must be > 1 and --eps values >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("broken,reason", [("garbage", "file is not a database"),
                                            ("folder", "unable to open database file")])
def test_a_sweep_db_that_is_no_database_is_a_clear_error(tiny_model_dir, tmp_path, capsys, broken, reason):
    out = tmp_path / "sw"
    out.mkdir()
    if broken == "garbage":
        (out / "sweep.db").write_bytes(b"\x00not sqlite\xff" * 100)
    else:
        (out / "sweep.db").mkdir()
    assert main(["sweep", "--model", str(tiny_model_dir), "--label", "tiny", "--out", str(out), *TINY_EVAL]) == 1
    assert f"error: {out}/sweep.db is not a readable Optuna study ({reason}): restore it or use another --out" \
        in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()  # refused before the pre-attack evaluation


def test_adaptive_needs_a_finished_demo(tmp_path, capsys):
    assert main(["adaptive", "--out", str(tmp_path / "a"), "--demo_dir", str(tmp_path / "nodemo")]) == 2
    assert "is not a demo directory (no demo_config.json)" in capsys.readouterr().err
    (tmp_path / "nodemo").mkdir()
    (tmp_path / "nodemo" / "demo_config.json").write_text("{}")  # a demo stopped before its models were saved
    assert main(["adaptive", "--out", str(tmp_path / "a"), "--demo_dir", str(tmp_path / "nodemo")]) == 2
    assert "is not a finished demo (missing" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["adaptive", "--out", str(tmp_path / "a"), "--demo_dir", str(tmp_path / "nodemo"), "--models",
                 "raw"]) == 2
    assert "models must be among ['aligned', 'seam'], got ['raw']" in capsys.readouterr().err


@pytest.mark.slow
def test_adaptive_on_a_shrunken_demo_runs_every_recipe_and_resumes(tiny_model_dir, tmp_path):
    from seamlm.adaptive import AdaptiveConfig, run_adaptive
    from seamlm.pipeline import DemoConfig, run_demo
    from seamlm.results import ResultStore

    demo = tmp_path / "demo"
    run_demo(demo, DemoConfig(model=str(tiny_model_dir), align_steps=1, align_batch_size=2, defense_steps=1,
                              defense_batch_size=2, max_length=48, attack_lrs=(1e-3,), attack_samples=4, hs_prompts=2,
                              zs_limit=2, zs_tasks=("arc_easy",), fs=False, judge="keyword", coupling_examples=0))
    cfg = AdaptiveConfig(demo_dir=str(demo), learning_rates=(1e-3,), sweep_trials=2, sweep_batch_sizes=(2,))
    report = run_adaptive(tmp_path / "adaptive", cfg).read_text()
    rows = ResultStore(tmp_path / "adaptive" / "results.jsonl").rows()
    for model in ("aligned", "seam"):
        recipes = {r.attack.get("recipe") for r in rows if r.model == model and "trial" not in r.attack}
        assert recipes == {None, *cfg.recipes}  # None: the pre-attack cell
        controls = [r for r in rows if r.model == model and r.attack.get("knobs", {}).get("train") is False]
        assert controls and all(r.attack.get("prompt_template") is None for r in controls)
        assert len({r.cell for r in rows if r.model == model and "trial" in r.attack}) == 2
    assert "| seam | 20 |" in report and "| aligned | 5 |" in report
    assert (tmp_path / "adaptive" / "report" / "hs_zs_scatter.png").is_file()
    n = len(rows)
    run_adaptive(tmp_path / "adaptive", cfg)  # everything finished: nothing is redone
    assert len(ResultStore(tmp_path / "adaptive" / "results.jsonl").rows()) == n
    assert "has not finished" not in report
    # the report of a run killed during the SEAM sweep says what is still to run
    from seamlm.report import write_report

    timings = tmp_path / "adaptive" / "timings.jsonl"
    timings.write_text("".join(x for x in timings.read_text().splitlines(True) if '"stage": "sweep_seam"' not in x))
    again = write_report(tmp_path / "adaptive" / "results.jsonl", tmp_path / "partial").read_text()
    assert "This adaptive run has not finished (still to run: sweep_seam): the worst case is over" in again


@pytest.mark.parametrize("args,message", [
    (["--eps", "5,-1"], "eps must be ZS-drop bounds >= 0"),
    (["--ppl_factor", "1"], "ppl_factor must be > 1"),
    (["--sweep_max_epochs", "0"], "sweep_max_epochs must be >= 1"),
    (["--sweep_batch_sizes", "4,0"], "sweep_batch_sizes must be >= 1"),
    (["--sweep_seed", "-1"], "sweep_seed must be in 0 … 4294967295"),
])
def test_bad_adaptive_bounds_are_refused_before_any_work(tmp_path, capsys, args, message):
    rc = main(["adaptive", "--out", str(tmp_path / "a"), "--demo_dir", str(tmp_path / "no-demo"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_adaptive_refuses_a_demo_whose_data_answers_differ_from_the_rebuilt_bundle(tmp_path):
    import json

    from seamlm.adaptive import _same_data
    from seamlm.data.bundles import build_bundle
    from seamlm.errors import ConfigError

    bundle = build_bundle("offline-default", seed=0)
    bundle.write(tmp_path / "d")
    _same_data(tmp_path / "d", bundle)  # the demo's own bundle: the same
    path = tmp_path / "d" / "defense_harmful.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "response": first["response"] + " (another version of the source)"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="harmful stream differs .* \\(other answers\\)"):
        _same_data(tmp_path / "d", bundle)
    # a demo built before the attack stream left out rows carrying a defence answer: said so, with what to do
    from seamlm.data.files import Example

    bundle.write(tmp_path / "old")
    path = tmp_path / "old" / "attack_harmful.jsonl"
    leaked = Example("Another prompt, the same answer", bundle.streams["harmful"][0].response)
    path.write_text(path.read_text() + json.dumps({"prompt": leaked.prompt, "response": leaked.response}) + "\n")
    with pytest.raises(ConfigError, match=r"holds 1 row\(s\) whose answer its defence trains on.*rerun the demo"):
        _same_data(tmp_path / "old", bundle)


def test_a_rescored_adaptive_folder_resumes_with_its_new_judge(tiny_model_dir, tmp_path, monkeypatch):
    from seamlm.adaptive import JUDGE_FILE, AdaptiveConfig, run_adaptive
    from seamlm.evaluate.judges import JUDGES
    from seamlm.pipeline import DemoConfig, run_demo
    from seamlm.rescore import rescore
    from seamlm.results import ResultStore
    from tests.test_rescore import LengthJudge

    monkeypatch.setitem(JUDGES, "length", lambda **kw: LengthJudge())
    demo_cfg = DemoConfig(model=str(tiny_model_dir), align_steps=1, align_batch_size=2, defense_steps=1,
                          defense_batch_size=2, max_length=48, attack_lrs=(1e-3,), attack_samples=4, hs_prompts=2,
                          zs_limit=2, zs_tasks=("arc_easy",), fs=False, judge="keyword", coupling_examples=0)
    run_demo(tmp_path / "demo", demo_cfg)
    cfg = AdaptiveConfig(demo_dir=str(tmp_path / "demo"), models=("seam",), recipes=("sft",), learning_rates=(1e-3,),
                         template_control=False, sweep_trials=0)
    out, other = tmp_path / "adaptive", tmp_path / "other"
    run_adaptive(out, cfg)
    run_adaptive(other, cfg)
    assert rescore(out, demo_cfg.eval_config().replace(judge="length"))
    assert (out / JUDGE_FILE).is_file()
    rows = ResultStore(out / "results.jsonl").rows()
    run_adaptive(out, cfg)  # resumes on the length judge: nothing refused, nothing redone
    assert ResultStore(out / "results.jsonl").rows() == rows
    assert {r.judge for r in rows if r.metric == "hs"} == {"length-v1"}
    # the demo rescored, an adaptive folder of it that was not: pointed to the rescore, not to --fresh
    from seamlm.errors import ConfigError

    assert rescore(tmp_path / "demo", demo_cfg.eval_config().replace(judge="length"))
    with pytest.raises(ConfigError, match=r"judged by keyword-v4, but the demo is judged by length-v1 .*seamlm "
                       r"rescore .*other --judge length"):
        run_adaptive(other, cfg)


def test_adaptive_refuses_an_out_that_is_the_demo_folder_or_inside_it(tmp_path, capsys):
    demo = tmp_path / "demo"
    for model in ("models/aligned", "models/seam/model"):
        (demo / model).mkdir(parents=True)
        (demo / model / "seamlm_run.json").write_text("{}")
    (demo / "demo_config.json").write_text("{}")
    for out in (demo, demo / "adaptive", tmp_path):
        assert main(["adaptive", "--out", str(out), "--demo_dir", str(demo)]) == 2
        assert "is the demo folder" in capsys.readouterr().err
    assert not (demo / "adaptive").exists() and not (demo / "adaptive_config.json").exists()
