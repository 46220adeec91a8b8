"""ε-bounded selection on a hand-made trial table, and the Optuna sweep's resume from its SQLite file."""

import csv
import json

import pytest

import seamlm.sweep as sweep_mod
from seamlm.data.bundles import BundleData
from seamlm.errors import ConfigError
from seamlm.evaluate.judges import KeywordJudge
from seamlm.evaluate.metrics import EvalConfig
from seamlm.finetune import FinetuneConfig
from seamlm.recipes import make_recipe
from seamlm.report import write_report
from seamlm.results import ResultRow, ResultStore
from seamlm.selection import collect, worst_case, worst_case_rows
from seamlm.sweep import SweepConfig, open_study, run_sweep, suggest_training, sweep_study
from tests.conftest import BENIGN, HARMFUL, REFUSAL


def _cell(model, cell, hs, zs, ppl, **attack):
    return [ResultRow(model=model, defense="seam", cell=cell, metric=m, value=v, judge="keyword" if m == "hs" else None,
                      attack=attack if cell != "pre" else {})
            for m, v in (("hs", hs), ("zs_mean", zs), ("coherence_ppl", ppl), ("refusal_rate", 50.0))]


TABLE = (
    _cell("seam", "pre", 5, 60, 20)
    + _cell("seam", "a", 90, 30, 500, recipe="sft", lr=1e-3)      # broken: ZS −30, ppl 25×: never selected
    + _cell("seam", "b", 70, 48, 30, recipe="pcgrad", lr=1e-4)    # ZS −12: only for ε = 20
    + _cell("seam", "c", 40, 56, 25, recipe="anchored", lr=1e-4)  # ZS −4: for every ε
    + _cell("seam", "d", 60, 57, 45, recipe="sft", lr=1e-4)       # ZS −3 but ppl 2.25×: outside the coherence bound
    + _cell("seam", "e", 40, 58, 22, recipe="template", trial=3)  # ties c on HS with a smaller ZS drop: wins the tie
)


def test_epsilon_bounded_selection_on_a_hand_made_table():
    pre, attacked = collect(TABLE)
    assert pre["seam"].zs == 60 and len(attacked["seam"]) == 5
    pick = lambda eps, f=2.0: worst_case(pre["seam"], attacked["seam"], eps, f)  # noqa: E731
    assert pick(5).cell == "e" and pick(10).cell == "e" and pick(20).cell == "b"
    assert pick(5, f=3.0).cell == "d"  # a looser coherence bound admits d
    assert pick(1) is None  # nothing keeps ZS within 1 point
    rows = worst_case_rows(TABLE, (5, 20))
    assert [(r["eps"], r["best"].cell, r["eligible"]) for r in rows] == [(5, "e", 2), (20, "b", 3)]
    assert pick(5).source == "sweep" and pick(20).source == "recipe"
    # accuracies are k/n: a drop of exactly ε (33.33 → 28.33 = 5.000000000000004 in floats) is within ε = 5
    from seamlm.selection import AttackOutcome, within_bound

    base = AttackOutcome("m", "pre", 0.0, 100 * 20 / 60, 10.0, None, {})
    assert within_bound(AttackOutcome("m", "x", 50.0, 100 * 17 / 60, 10.0, None, {}), base, 5.0)
    assert not within_bound(AttackOutcome("m", "x", 50.0, 100 * 16 / 60, 10.0, None, {}), base, 5.0)
    # an attack that broke the model (perplexity overflowed) was measured, and is outside the bound; NaN was not
    broken, lost = (AttackOutcome("m", x, 50.0, 60.0, v, None, {}) for x, v in (("b", float("inf")), ("n", float("nan"))))
    assert broken.measured and not lost.measured and not within_bound(broken, base, 50.0)
    # and an unattacked model of infinite perplexity bounds nothing
    import dataclasses

    assert not within_bound(AttackOutcome("m", "x", 0.0, 60.0, 9.0, None, {}),
                            dataclasses.replace(base, ppl=float("inf")), 50.0)


def test_report_shows_the_worst_case_table_and_scatter(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(TABLE)
    md = write_report(store.path, tmp_path / "report", eps=(5.0, 20.0)).read_text()
    assert "Worst case under a utility bound" in md and (tmp_path / "report" / "hs_zs_scatter.png").stat().st_size > 0
    line = next(x for x in md.splitlines() if x.startswith("| seam | 20 |"))
    assert "pcgrad" in line and "| 70.0 |" in line and "48.0 (-12.0)" in line and "3 / 5" in line
    # adaptive cells stay out of the paper-style grid table: only the plain SFT cells a and d are columns there
    header = next(x for x in md.splitlines() if x.startswith("| model | pre-attack"))
    assert header.count("lr ") == 2


@pytest.fixture
def bundle():
    return BundleData({"harmful": HARMFUL[:4], "refusal": REFUSAL[:4], "benign": BENIGN[:4], "attack": HARMFUL[4:],
                       "eval_harmful": HARMFUL[:3], "benign_heldout": BENIGN[4:8], "attack_benign": BENIGN[8:]},
                      {"seed": 0})


EVAL = EvalConfig(judge="keyword", hs_prompts=3, max_new_tokens=4, zs_tasks=("arc_easy",), zs_limit=3,
                  coherence_examples=3, coupling_examples=0)


def _sweep(tiny_model_dir, bundle, tmp_path, trials, calls):
    cfg = SweepConfig(recipes=("sft", "anchored"), trials=trials, num_samples=4, batch_sizes=(2,), max_epochs=1,
                      startup_trials=10)
    return run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                     KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))


def test_killed_sweep_resumes_without_redoing_finished_trials(tiny_model_dir, bundle, tmp_path, monkeypatch):
    calls = []
    real = sweep_mod.attack_cell

    def counting(*a, **kw):
        out = real(*a, **kw)
        calls.append((kw["cell"], out.ran))
        return out

    monkeypatch.setattr(sweep_mod, "attack_cell", counting)
    study = _sweep(tiny_model_dir, bundle, tmp_path, 2, calls)
    assert len(study.trials) == 2 and len(calls) == 2
    # a process killed mid-trial leaves a RUNNING trial behind: simulate one with the parameters of trial 0
    cfg = SweepConfig(recipes=("sft", "anchored"), trials=3, num_samples=4, batch_sizes=(2,), max_epochs=1,
                      startup_trials=10)
    monkeypatch.setattr(sweep_mod, "open_study", open_study)
    import optuna

    stale = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path.resolve() / 'sweep.db'}")
    stale.enqueue_trial(study.trials[0].params)
    t = stale.ask()  # RUNNING and never told, after the objective suggested its parameters
    make_recipe(t.suggest_categorical("recipe", ["sft", "anchored"])).suggest(t)
    suggest_training(t, cfg)
    assert t.params == study.trials[0].params
    calls.clear()
    study = run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                      KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1
    # the stale trial's parameters ran again first; its cell was already in the results file, so nothing retrained
    assert calls == [(calls[0][0], False)] and study.trials[-1].params == study.trials[0].params
    # the resumed sampler does not replay the first process's random parameters
    calls.clear()
    study = run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg.replace(trials=5), FinetuneConfig(max_length=64),
                      EVAL, KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))
    assert len(calls) == 2 and all(ran for _, ran in calls)
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials if t.state.name == "COMPLETE"}) == 4
    rows = list(csv.DictReader((tmp_path / "sweep_trials.tiny.csv").open()))
    assert len(rows) == 6 and {r["state"] for r in rows} == {"COMPLETE", "FAIL"}
    # every finished trial is a cell of the results file with HS, ZS and perplexity
    pre, attacked = collect(ResultStore(tmp_path / "results.jsonl").rows())
    assert len(attacked["tiny"]) == 4 and all(o.attack["sweep"] == "tiny" for o in attacked["tiny"])


def test_a_sweep_stopped_by_ctrl_c_retries_the_interrupted_trial_first(tiny_model_dir, bundle, tmp_path,
                                                                        monkeypatch):
    # optuna records a trial the user interrupted as FAIL (not RUNNING, as a kill leaves it)
    real, calls = sweep_mod.attack_cell, []

    def interrupted(*a, **kw):
        calls.append(kw["meta"]["params"])
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "attack_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tiny_model_dir, bundle, tmp_path, 2, calls)
    monkeypatch.setattr(sweep_mod, "attack_cell", lambda *a, **kw: (calls.append(kw["meta"]["params"]), real(*a, **kw))[1])
    study = _sweep(tiny_model_dir, bundle, tmp_path, 2, calls)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert calls[1] == calls[0] and len(calls) == 3  # the interrupted parameters first, then one new draw
    # retried once: a later resume does not enqueue it again
    study = _sweep(tiny_model_dir, bundle, tmp_path, 2, calls)
    assert len(study.trials) == 3 and len(calls) == 3
    # nor parameters whose retry stopped as well (an error that recurs): the next run draws new ones
    monkeypatch.setattr(sweep_mod, "attack_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tiny_model_dir, bundle, tmp_path, 3, calls)
    first = calls[-1]
    with pytest.raises(KeyboardInterrupt):
        _sweep(tiny_model_dir, bundle, tmp_path, 3, calls)
    assert calls[-1] == first  # its retry, which stops too
    with pytest.raises(KeyboardInterrupt):
        _sweep(tiny_model_dir, bundle, tmp_path, 3, calls)
    assert calls[-1] != first


def test_sweep_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipes"):
        SweepConfig(recipes=("sft", "magic"))
    with pytest.raises(ConfigError, match="lr_min <= lr_max"):
        SweepConfig(lr_min=1e-3, lr_max=1e-5)
    open_study(SweepConfig(trials=2), "m", tmp_path)
    with pytest.raises(ConfigError, match=r"another sweep config \(lr_max: 0.001 → 0.01\)"):
        open_study(SweepConfig(trials=2, lr_max=1e-2), "m", tmp_path)
    # the same sweep config over another training base or evaluation is another study too
    context = {"model": "m", "train": {"max_length": 128}, "eval": {"hs_prompts": 32, "zs_tasks": ("arc_easy",)}}
    open_study(SweepConfig(trials=2), "m", tmp_path, context)  # an older study adopts its context
    open_study(SweepConfig(trials=3), "m", tmp_path, context)  # (tuples compare as stored lists)
    with pytest.raises(ConfigError, match=r"run with other eval, train settings \(eval.hs_prompts: 32 → 50, "
                                          r"train.max_length: 128 → 64\); use another --out"):
        open_study(SweepConfig(trials=3), "m", tmp_path, {**context, "train": {"max_length": 64},
                                                          "eval": {"hs_prompts": 50, "zs_tasks": ("arc_easy",)}})
    # a study that named its model by path (older seamlm) goes on under the weights' digest, not for another model
    named = {**context, "model": "sha256:0123"}
    with pytest.raises(ConfigError, match=r"run with other model settings \(model: 'm' → 'sha256:0123'\)"):
        open_study(SweepConfig(trials=3), "m", tmp_path, named, same_models={"elsewhere"})
    open_study(SweepConfig(trials=3), "m", tmp_path, named, same_models={"m"})
    open_study(SweepConfig(trials=3), "m", tmp_path, named)  # and the study now holds the new name
    assert open_study(SweepConfig(trials=3), "m", tmp_path).user_attrs["sweep_context"]["model"] == "sha256:0123"


def test_a_failing_trial_is_recorded_and_replaced_not_the_end_of_the_study(tiny_model_dir, bundle, tmp_path,
                                                                             monkeypatch):
    """A trial whose parameters do not fit the model (a subspace of 4 layers on 2) fails alone; the study draws
    another until it has its finished trials — also when one trial is left. Five failures in a row stop it."""
    from seamlm.errors import ConfigError

    real, calls = sweep_mod.attack_cell, []

    def first_fails(*a, **kw):
        calls.append(kw["cell"])
        if len(calls) == 1:
            raise ConfigError("subspace: layers [3] out of range for a model with 2 layers")
        return real(*a, **kw)

    monkeypatch.setattr(sweep_mod, "attack_cell", first_fails)
    study = _sweep(tiny_model_dir, bundle, tmp_path, 2, calls)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]

    calls.clear()  # one trial left (trials 3): its first draw fails, the next one finishes the study
    cfg = SweepConfig(recipes=("sft", "anchored"), trials=3, num_samples=4, batch_sizes=(2,), max_epochs=1,
                      startup_trials=10)
    study = run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                      KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]

    def always_fails(*a, **kw):
        raise ConfigError("no")

    monkeypatch.setattr(sweep_mod, "attack_cell", always_fails)
    with pytest.raises(ConfigError, match="the last 5 trials failed"):  # 17 trials missing: it stops within the round
        run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg.replace(trials=20), FinetuneConfig(max_length=64),
                  EVAL, KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))
    assert [t.state.name for t in study.trials][5:] == ["FAIL"] * 5


def test_a_sweep_searches_the_ablation_layer_without_training_knobs(tiny_model_dir, bundle, tmp_path):
    cfg = SweepConfig(recipes=("ablation",), trials=3, num_samples=4, startup_trials=10)
    study = run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                      KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    for t in done:
        assert set(t.params) == {"layer_fraction", "n_prompts"}  # a weight edit: no lr, optimizer or epochs
        info = json.loads((tmp_path / "attacks" / "tiny" / t.user_attrs["cell"] / "ablation.json").read_text())
        assert info["layer"] == min(1, round(2 * t.params["layer_fraction"]))  # the tiny model has 2 layers
    with pytest.raises(ConfigError, match="layer_fraction"):
        make_recipe("ablation", {"layer_fraction": 1.0})


def test_a_second_study_of_another_seed_in_one_out_folder_runs_its_own_cells(tiny_model_dir, bundle, tmp_path):
    # the ConfigError for a changed sweep config says "use another --study_name": that study, with another seed,
    # draws other harmful prompts, so the same parameters must make a new cell, not read back the first study's
    store = ResultStore(tmp_path / "results.jsonl")
    runs = {}
    for seed, name in ((0, "a"), (1, "b")):
        cfg = SweepConfig(recipes=("ablation",), trials=1, num_samples=4, startup_trials=10, seed=seed,
                          study_name=name)
        study = sweep_study(str(tiny_model_dir), "tiny", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                            KeywordJudge(), tmp_path)
        study.enqueue_trial({"layer_fraction": 0.5, "n_prompts": 16})
        runs[seed] = run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64),
                               EVAL, KeywordJudge(), tmp_path, store, study=study).trials[0]
    assert runs[0].params == runs[1].params
    cells = {seed: t.user_attrs["cell"] for seed, t in runs.items()}
    assert cells[0] != cells[1]
    seeds = {r.cell: json.loads((store.settings_dir / f"{r.settings}.json").read_text())["seed"]
             for r in store.rows() if r.cell in cells.values()}
    assert seeds == {cells[0]: 0, cells[1]: 1}


def test_a_second_study_with_other_training_settings_in_one_out_folder_runs_its_own_cells(tiny_model_dir, bundle,
                                                                                          tmp_path):
    # same seed, same parameters drawn, but another harmful budget: following the "use another --study_name" advice
    # must give the second study its own cell, not the error that the first study's cell has other settings
    store = ResultStore(tmp_path / "results.jsonl")
    params = {"optimizer": "adamw", "lr_adamw": 1e-4, "max_grad_norm": 0.0, "lr_scheduler": "cosine",
              "warmup_ratio": 0.0, "batch_size": 4, "epochs": 1}
    runs = {}
    for n, name in ((4, "a"), (2, "b")):
        cfg = SweepConfig(recipes=("sft",), trials=1, num_samples=n, startup_trials=10, study_name=name)
        study = sweep_study(str(tiny_model_dir), "tiny", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                            KeywordJudge(), tmp_path)
        study.enqueue_trial(params)
        runs[name] = run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64),
                               EVAL, KeywordJudge(), tmp_path, store, study=study).trials[0]
    assert runs["a"].state.name == runs["b"].state.name == "COMPLETE"
    assert runs["a"].user_attrs["cell"] != runs["b"].user_attrs["cell"]


def test_a_sweep_that_may_choose_the_plain_template_records_its_prompt_format(tiny_model_dir, bundle, tmp_path):
    """The template recipe's trials may format in the plain template, whose prompt format changed (version 2): a
    study from before, which did not record it, is not resumed; a chat-only sweep's context has no format."""
    from seamlm.models import PROMPT_FORMAT_VERSION

    def context(recipes, name):
        study = sweep_study(str(tiny_model_dir), "tiny", bundle, SweepConfig(recipes=recipes, trials=1, study_name=name),
                            FinetuneConfig(), EVAL, KeywordJudge(), tmp_path)
        return study.user_attrs["sweep_context"]

    assert context(("template", "sft"), "a")["prompt_format"] == PROMPT_FORMAT_VERSION
    assert "prompt_format" not in context(("sft",), "b")
    old = {k: v for k, v in context(("template",), "c").items() if k != "prompt_format"}
    open_study(SweepConfig(recipes=("template",), trials=1, study_name="d"), "tiny", tmp_path, old)
    with pytest.raises(ConfigError, match="run with other prompt_format settings"):
        context(("template",), "d")


def test_a_sweep_without_zs_tasks_is_refused_before_it_starts(bundle, tmp_path):
    no_zs = EvalConfig.from_dict({**EVAL.to_dict(), "zs_tasks": ""})
    with pytest.raises(ConfigError, match="zs_tasks is empty, but the sweep selects trials by their ZS drop"):
        sweep_study("m", "tiny", bundle, SweepConfig(trials=2), FinetuneConfig(max_length=64), no_zs, KeywordJudge(),
                    tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_failure_streak_skips_interrupted_and_queued_trials():
    import optuna
    from optuna.trial import TrialState

    from seamlm.sweep import _failures_in_a_row

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _ in range(3):
        study.tell(study.ask(), state=TrialState.FAIL)
    killed = study.ask()
    study.tell(killed, state=TrialState.FAIL)  # killed outright: open_study lists it in retried_trials
    study.set_user_attr("retried_trials", [killed.number])
    stopped = study.ask()
    stopped.set_user_attr("interrupted", True)  # Ctrl-C
    study.tell(stopped, state=TrialState.FAIL)
    study.enqueue_trial({"x": 1})  # its retry, waiting
    assert _failures_in_a_row(study) == 3
    study.tell(study.ask(), state=TrialState.FAIL)  # the retry failed on its parameters
    assert _failures_in_a_row(study) == 4
    study.tell(study.ask(), 1.0)
    assert _failures_in_a_row(study) == 0


def test_a_study_another_process_runs_is_refused_before_it_is_opened(tiny_model_dir, bundle, tmp_path, monkeypatch):
    """A second process on one study would fail the first's running trials as a killed sweep's and run them again."""
    from seamlm.locks import HolderLock

    opened = []
    monkeypatch.setattr(sweep_mod, "open_study", lambda *a, **k: opened.append(1))
    other = HolderLock(tmp_path / ".sweep.tiny.lock", "sweep tiny")
    assert other.acquire()
    with pytest.raises(ConfigError, match=r"study 'tiny' in .* is being run by another process \(seamlm sweep tiny, "
                       r"pid \d+.*another --study_name"):
        _sweep(tiny_model_dir, bundle, tmp_path, 1, [])
    assert not opened
    other.release()
    # free again (and named by the study)
    with sweep_mod.study_lock(SweepConfig(study_name="tiny"), "x", tmp_path), \
            pytest.raises(ConfigError, match="being run by another process"):
        _sweep(tiny_model_dir, bundle, tmp_path, 1, [])


def test_a_sweep_without_the_coherence_figure_is_refused_before_it_starts(bundle, tmp_path):
    """Its selection bounds the benign perplexity: without it no trial is ever within the bound."""
    with pytest.raises(ConfigError, match="coherence_examples is 0, but the sweep selects trials within a coherence"):
        sweep_study("m", "tiny", bundle, SweepConfig(trials=2), FinetuneConfig(max_length=64),
                    EVAL.replace(coherence_examples=0), KeywordJudge(), tmp_path)
    assert not list(tmp_path.iterdir())


def test_each_study_writes_its_own_trials_table(tiny_model_dir, bundle, tmp_path):
    for name in ("a", "b"):
        cfg = SweepConfig(recipes=("sft",), trials=1, num_samples=4, batch_sizes=(2,), max_epochs=1, study_name=name)
        run_sweep(str(tiny_model_dir), "tiny", "none", bundle, cfg, FinetuneConfig(max_length=64), EVAL,
                  KeywordJudge(), tmp_path, ResultStore(tmp_path / "results.jsonl"))
    tables = {p.name: p.read_text().splitlines() for p in tmp_path.glob("sweep_trials.*.csv")}
    assert sorted(tables) == ["sweep_trials.a.csv", "sweep_trials.b.csv"] and all(len(t) == 2 for t in tables.values())


def test_a_study_seeded_with_the_largest_seed_resumes(tmp_path):
    """The sampler of a resumed study is seeded with seed + trials so far, kept inside numpy's 0 … 2**32 − 1."""
    cfg = SweepConfig(seed=2**32 - 1)
    study = open_study(cfg, "top", tmp_path)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    resumed = open_study(cfg, "top", tmp_path)  # numpy refused the seed 2**32 here
    resumed.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert len(resumed.trials) == 2
