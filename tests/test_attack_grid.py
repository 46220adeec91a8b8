"""The attack grid on a tiny model: cells evaluated and appended, a stopped grid resumes, bad configs."""

import json
import math
import shutil
import statistics

import pytest
import yaml

import seamlm.attack as attack_mod
from seamlm.attack import AttackConfig, cell_key, evaluate_pre_attack, run_attack_grid, samples_file
from seamlm.data.bundles import BundleData
from seamlm.data.files import Example
from seamlm.errors import ConfigError, DataError
from seamlm.evaluate.judges import KeywordJudge
from seamlm.evaluate.metrics import EvalConfig
from seamlm.finetune import FinetuneConfig
from seamlm.recipes import make_recipe
from seamlm.results import ResultStore
from seamlm.runinfo import fingerprint
from tests.conftest import BENIGN, HARMFUL, REFUSAL

EVAL = EvalConfig(judge="keyword", hs_prompts=3, max_new_tokens=4, zs_tasks=("arc_easy",), zs_limit=3,
                  coherence_examples=3, gen_batch_size=4)


def _bundle() -> BundleData:
    return BundleData({"harmful": HARMFUL[:6], "refusal": REFUSAL[:6], "benign": BENIGN[:6], "attack": HARMFUL[6:],
                       "eval_harmful": HARMFUL[:3], "benign_heldout": BENIGN[6:]}, {"seed": 0})


@pytest.fixture
def bundle():
    return _bundle()


def _grid(tiny_model_dir, bundle, tmp_path, store, lrs=(1e-4, 1e-3), **kw):
    cfg = AttackConfig(learning_rates=lrs, num_samples=4, batch_size=2, **kw)
    return run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, EVAL, KeywordJudge(), tmp_path, store)


def test_grid_cells_rows_and_resume(tiny_model_dir, bundle, tmp_path, monkeypatch, caplog):
    store = ResultStore(tmp_path / "results.jsonl")
    assert evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
    assert not evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)

    real_eval, calls = attack_mod.evaluate_model, []

    def dies_on_second_cell(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while evaluating the second cell
        return real_eval(*a, **k)

    monkeypatch.setattr(attack_mod, "evaluate_model", dies_on_second_cell)
    with pytest.raises(KeyboardInterrupt):
        _grid(tiny_model_dir, bundle, tmp_path, store)
    monkeypatch.setattr(attack_mod, "evaluate_model", real_eval)
    cells = {r.cell for r in store.rows()}
    assert cells == {"pre", "sft-full-adamw-lr0.0001-n4-ep1-b2-s0"}

    ran = _grid(tiny_model_dir, bundle, tmp_path, store)
    assert ran == ["sft-full-adamw-lr0.001-n4-ep1-b2-s0"]  # the finished cell is not redone
    assert "4 requested" not in caplog.text
    rows = store.rows()
    by_cell = {}
    for r in rows:
        by_cell.setdefault(r.cell, {})[r.metric] = r
    for cell, metrics in by_cell.items():
        assert {"hs", "hs_se", "refusal_rate", "zs_mean", "zs_mean_se", "zs_arc_easy", "coherence_ppl"} <= set(metrics), cell
        assert {r.judge for r in metrics.values()} == {"keyword-v4"}  # every row of the cell names its judge
        # the standard errors of the cell's own numbers: its saved 0/1 judgements, its ZS task's share
        p = [json.loads(x)["p_harmful"] for x in samples_file(tmp_path, "tiny", cell).read_text().splitlines()]
        assert metrics["hs_se"].value == pytest.approx(100 * statistics.stdev(p) / math.sqrt(len(p)))
        acc, n = metrics["zs_arc_easy"].value / 100, EVAL.zs_limit
        assert metrics["zs_mean_se"].value == pytest.approx(100 * math.sqrt(acc * (1 - acc) / (n - 1)))
        if cell != "pre":
            att = metrics["hs"].attack
            assert att["samples"] == 4 and att["status"] == "ok"
            losses = [json.loads(x)["loss"] for x in (tmp_path / att["loss_log"]).read_text().splitlines()]
            assert len(losses) == 2 and metrics["attack_final_loss"].value == losses[-1]  # 10 % of 2 steps = 1
    assert _grid(tiny_model_dir, bundle, tmp_path, store) == []


def test_standard_errors_by_hand():
    from seamlm.evaluate.stats import mean_stderr, paired_difference

    assert mean_stderr([1.0, 2.0, 3.0, 6.0]) == pytest.approx(statistics.stdev([1, 2, 3, 6]) / 2)  # sd 2.16, √4
    assert math.isnan(mean_stderr([5.0]))
    # two models on the same prompts: the prompts' shared spread cancels in the pairs (differences 1, 1, 2)
    diff, se = paired_difference([10.0, 50.0, 90.0], [11.0, 51.0, 92.0])
    assert diff == pytest.approx(4 / 3) and se == pytest.approx(statistics.stdev([1, 1, 2]) / math.sqrt(3))
    with pytest.raises(ConfigError, match="3 and 2 items"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ConfigError, match="0 and 0 items"):
        paired_difference([], [])


def test_lora_cell_and_sample_shortfall(tiny_model_dir, bundle, tmp_path, caplog):
    store = ResultStore(tmp_path / "r.jsonl")
    cfg = AttackConfig(learning_rates=(1e-3,), num_samples=100, batch_size=3, lora=True, lora_r=2)
    ran = run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, EVAL, KeywordJudge(), tmp_path, store)
    assert ran == ["sft-lora-r2-adamw-lr0.001-n6-ep1-b3-s0"]
    assert "6 harmful examples available, 100 requested" in caplog.text
    # the count asked for is kept beside the count trained on (runs of other data seeds line up by it)
    assert {(r.attack["samples"], r.attack["samples_requested"]) for r in store.rows() if r.cell != "pre"} == {(6, 100)}


def test_grid_spans_samples_epochs_and_seeds():
    cfg = AttackConfig(learning_rates=(1e-4, 2e-4), num_samples=(10, 20), num_epochs=(1, 2), seeds=(0, 1))
    cells = cfg.cells()
    sft = make_recipe("sft")
    keys = {cell_key(FinetuneConfig(lr=c["lr"], seed=c["seed"], epochs=c["epochs"]), sft, c["num_samples"]) for c in cells}
    assert len(cells) == 16 and len(keys) == 16
    with pytest.raises(ConfigError, match="through the grid fields"):
        AttackConfig(lr=1e-4)


def test_a_weight_edit_in_another_template_is_another_cell():
    # ablation reads its prompts through --prompt_template and is measured in it: same knobs, other template, so
    # another cell (not the "made with other settings" error); the chat template keeps the name it always had
    ablation = make_recipe("ablation")
    chat = cell_key(FinetuneConfig(), ablation, 8)
    assert chat == f"ablation-{fingerprint(ablation.knobs.to_dict())[:6]}-n8-s0"
    alpaca = cell_key(FinetuneConfig(prompt_template="alpaca"), ablation, 8)
    assert alpaca.startswith(chat + "-h") and alpaca != cell_key(FinetuneConfig(prompt_template="plain"), ablation, 8)
    assert cell_key(FinetuneConfig(lr=1e-3), ablation, 8) == chat  # a weight edit has no learning rate


@pytest.mark.parametrize("values,match", [
    ({"learning_rates": "0,1e-4"}, "learning_rates 0: .*learning rates > 0"),
    ({"learning_rates": "fast"}, "expects float"),
    ({"learning_rates": "1e-4,nan"}, "must be a finite number"),
    ({"optimizer": "adam"}, "must be one of"),
    ({"lr_grid": "1e-4"}, "unknown AttackConfig key"),
    ({"num_samples": "0"}, "num_samples 0: num_samples and num_epochs must be >= 1"),
    ({"num_epochs": "-1"}, "num_epochs -1: "),
])
def test_bad_attack_configs(values, match):
    with pytest.raises(ConfigError, match=match):
        AttackConfig.from_dict(values)


def test_the_config_written_next_to_a_grid_reads_back_through_config(tmp_path):
    from seamlm.config import read_yaml_mapping

    cfg = AttackConfig.from_dict({"learning_rates": "1e-5,3e-4", "seeds": "1,2", "optimizer": "sgd"})
    cfg.to_yaml(tmp_path / "attack_config.yaml")
    values = read_yaml_mapping(tmp_path / "attack_config.yaml")
    AttackConfig.refuse_grid_owned(values, "attack_config.yaml")  # no one-cell lr/epochs/seed in it
    assert AttackConfig.from_yaml(tmp_path / "attack_config.yaml") == cfg
    # a folder's record from an older seamlm (with the one-cell fields) is the same grid: kept, nothing put beside
    from seamlm.jsonl import keep_record

    old = tmp_path / "old" / "attack_config.m.yaml"
    old.parent.mkdir()
    old.write_text(yaml.safe_dump({**cfg.to_dict(), "lr": 2e-5, "epochs": 1, "seed": 0}))
    assert keep_record(old, cfg.to_yaml_text(), same=AttackConfig.same_record) == old
    other = AttackConfig.from_dict({"learning_rates": "1e-3"})
    beside = keep_record(old, other.to_yaml_text(), same=AttackConfig.same_record)
    assert beside != old and beside.parent == old.parent and AttackConfig.from_yaml(beside) == other
    assert sorted(p.name for p in old.parent.iterdir()) == sorted([old.name, beside.name])


def test_bad_eval_config_names_the_field():
    with pytest.raises(ConfigError, match=r"hs_prompts = -1, fs_test = -2: sizes must be >= 0"):
        EvalConfig.from_dict({"hs_prompts": "-1", "fs_test": "-2"})


def test_eval_refuses_a_zero_shot_task_that_feeds_training(tiny_model_dir, bundle, tmp_path):
    bundle.manifest["zero_shot_exclude"] = ["arc_easy"]
    with pytest.raises(ConfigError, match="feed this bundle's training data"):
        evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL, KeywordJudge(), tmp_path,
                            ResultStore(tmp_path / "r.jsonl"))


def test_eval_refuses_an_lm_eval_task_that_feeds_training(tiny_model_dir, bundle, tmp_path):
    # offline-default trains on PIQA's validation split, which lm-eval's piqa task scores
    bundle.manifest["zero_shot_exclude"] = ["piqa"]
    with pytest.raises(ConfigError, match=r"lm-eval tasks \['piqa'\] score the split that feeds"):
        evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL.replace(lm_eval_tasks=("piqa",)),
                            KeywordJudge(), tmp_path, ResultStore(tmp_path / "r.jsonl"))


def test_changed_settings_do_not_reuse_old_cells(tiny_model_dir, bundle, tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    first = _grid(tiny_model_dir, bundle, tmp_path, store, lrs=(1e-4,))
    # another hardening of the attack is another cell (a digest of the changed fields ends its key) ...
    second = _grid(tiny_model_dir, bundle, tmp_path, store, lrs=(1e-4,), weight_decay=0.0)
    assert second[0].startswith(first[0] + "-h")
    # ... while other evaluation settings for an existing cell are an error, not a silent reuse
    cfg = AttackConfig(learning_rates=(1e-4,), num_samples=4, batch_size=2)
    # the error names what changed (from the settings record kept next to the results)
    with pytest.raises(DataError, match=r"made with other settings \(eval\.hs_prompts: 3 → 2\)"):
        run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, EVAL.replace(hs_prompts=2), KeywordJudge(),
                        tmp_path, store)
    evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
    with pytest.raises(DataError, match=r"other settings \(eval\.judge: 'keyword' → 'minilm'; judge: 'keyword-v4' → 'x'\)"):
        evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL.replace(judge="minilm"), _Named("x"),
                            tmp_path, store)
    # rows from before the settings records: the error says the change is unknown rather than guessing
    for f in store.settings_dir.iterdir():
        f.unlink()
    with pytest.raises(DataError, match="predate seamlm's settings records"):
        evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, EVAL.replace(hs_prompts=2), KeywordJudge(),
                            tmp_path, store)


class _Named(KeywordJudge):
    def __init__(self, name):
        super().__init__()
        self.name = name


def test_lm_eval_tasks_add_rows_and_leave_older_results_resumable(tiny_model_dir, bundle, tmp_path, monkeypatch):
    """An lm-eval task (local YAML, offline) adds an ``lmeval_<task>`` row; with no lm-eval task the settings
    digest is the one of a config without those fields, so results from before them still resume."""
    pytest.importorskip("lm_eval")
    from tests.test_zeroshot import write_lm_eval_task

    assert "lm_eval_tasks" not in EVAL.settings_dict() and "zs_tasks" in EVAL.settings_dict()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tasks = write_lm_eval_task(tmp_path, n=6)
    ev = EVAL.replace(lm_eval_tasks=("seamlm_fixture_arc",), lm_eval_include_path=str(tasks))
    settings = ev.settings_dict()
    assert settings["lm_eval_tasks"] == ["seamlm_fixture_arc"] and settings["lm_eval_version"]
    (tasks / "fixture.yaml").write_text((tasks / "fixture.yaml").read_text() + "\n")
    assert ev.settings_dict()["lm_eval_include_digest"] != settings["lm_eval_include_digest"]  # an edited task
    store = ResultStore(tmp_path / "results.jsonl")
    evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, ev, KeywordJudge(), tmp_path, store)
    rows = {r.metric: r.value for r in store.rows()}
    assert 0 <= rows["lmeval_seamlm_fixture_arc"] <= 100 and "zs_arc_easy" in rows
    with pytest.raises(ConfigError, match="lm_eval_include_path is set but lm_eval_tasks is empty"):
        EVAL.replace(lm_eval_include_path=str(tasks))
    with pytest.raises(ConfigError, match="lm_eval_limit is set but lm_eval_tasks is empty"):
        EVAL.replace(lm_eval_limit=5)


def test_attack_and_eval_refuse_prompts_the_model_was_trained_on(tokenizer, bundle, tmp_path):
    """A SEAM run lists its training prompts beside the model; attacking or evaluating that model (or one trained
    from it) on data that contains them is refused, naming how many — disjoint data passes."""
    from seamlm.defense import DefenseConfig, SEAMTrainer
    from seamlm.models import save_model, trained_prompt_hashes
    from tests.conftest import make_model

    defended = tmp_path / "seam"
    cfg = DefenseConfig(output_dir=str(defended), steps=1, batch_size=2, max_length=48, checkpoint_every=0)
    SEAMTrainer(make_model(len(tokenizer)), tokenizer, cfg, harmful=bundle.streams["harmful"],
                refusal=bundle.streams["refusal"], benign=bundle.streams["benign"]).train()
    seam = defended / "model"
    assert len(trained_prompt_hashes(seam)) == len({e.prompt for e in HARMFUL[:6] + BENIGN[:6]})
    held_out = BundleData({**bundle.streams, "eval_harmful": HARMFUL[6:9]}, {"seed": 0})
    attack_mod.check_held_out(str(seam), held_out)  # disjoint: fine

    store = ResultStore(tmp_path / "results.jsonl")
    with pytest.raises(DataError, match="3 of 3 eval_harmful"):  # the fixture bundle evaluates on HARMFUL[:3]
        evaluate_pre_attack(str(seam), "seam", "seam", bundle, EVAL, KeywordJudge(), tmp_path, store)
    leaky = BundleData({**held_out.streams, "attack": HARMFUL[4:10]}, {"seed": 0})
    derived = tmp_path / "derived"  # a model trained from the SEAM one inherits its list
    model, tok = attack_mod.load_model(str(seam))
    save_model(model, tok, derived, {"stage": "test", "model": str(seam)})
    shutil.move(seam, tmp_path / "moved")  # the list was carried over: the check needs no path to the SEAM model
    with pytest.raises(DataError, match="2 of 6 attack"):
        run_attack_grid(str(derived), "derived", "seam", leaky, AttackConfig(learning_rates=(1e-4,), num_samples=2),
                        EVAL, KeywordJudge(), tmp_path, store)
    assert not store.path.exists()


def test_the_peak_of_probes_with_a_nan_is_nan_wherever_it_stands():
    from seamlm.attack import peak

    assert peak([3.0, 5.0, 4.0]) == 5.0
    assert math.isnan(peak([3.0, 5.0, math.nan])) and math.isnan(peak([math.nan, 3.0, 5.0]))


def test_trajectory_probes_add_the_peak_perplexity_and_leave_pre_attack_cells_alone(tiny_model_dir, bundle, tmp_path):
    from seamlm.report import write_report

    store = ResultStore(tmp_path / "results.jsonl")
    plain = EVAL.replace(coupling_examples=2)
    assert evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, plain, KeywordJudge(), tmp_path, store)
    probed = plain.replace(trajectory_every=1, trajectory_examples=2)
    # the probes belong to attacks: the unattacked cell stays done
    assert not evaluate_pre_attack(str(tiny_model_dir), "tiny", "none", bundle, probed, KeywordJudge(), tmp_path,
                                   store)
    cfg = AttackConfig(learning_rates=(1e-2,), num_samples=4, batch_size=2)
    run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, probed, KeywordJudge(), tmp_path, store)
    rows = {r.metric: r for r in store.rows() if r.cell != "pre"}
    probes = [json.loads(x) for x in (tmp_path / rows["hs"].attack["probe_log"]).read_text().splitlines()]
    assert [p["updates"] for p in probes] == [0, 1, 2]
    assert all({"benign_ppl", "coupling_cos", "coupling_slope"} <= set(p) for p in probes)
    assert rows["attack_peak_ppl"].value == max(p["benign_ppl"] for p in probes)
    assert rows["attack_start_ppl"].value == probes[0]["benign_ppl"]  # the peak's baseline, on the same answers
    # the same attack without probes lacks a metric: not a silent reuse
    with pytest.raises(DataError, match="trajectory_every"):
        run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, plain, KeywordJudge(), tmp_path, store)
    md = write_report(store.path, tmp_path / "report").read_text()
    assert "benign perplexity during the attack, before its first step -> its highest" in md
    assert f"{rows['attack_start_ppl'].value:.2f} -> {rows['attack_peak_ppl'].value:.2f}" in md
    assert "attack_trajectory.png" in md
    assert (tmp_path / "report" / "attack_trajectory.png").stat().st_size > 0


def test_a_weight_edit_runs_no_probes_and_its_cell_resumes_with_or_without_them(tiny_model_dir, bundle, tmp_path):
    from seamlm.recipes import make_recipe

    bundle = BundleData({**bundle.streams, "attack_benign": BENIGN[:4]}, bundle.manifest)
    store = ResultStore(tmp_path / "results.jsonl")
    cfg = AttackConfig(learning_rates=(1e-2,), num_samples=4, batch_size=2)
    probed = EVAL.replace(trajectory_every=1, trajectory_examples=2)
    ablation = make_recipe("ablation", {"layer": 1, "n_prompts": 2})
    assert run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, probed, KeywordJudge(), tmp_path, store,
                           recipe=ablation)
    rows = store.rows()
    assert not any(r.metric == "attack_peak_ppl" for r in rows)  # no training steps: nothing to probe
    for ev in (EVAL, probed):  # the probe setting is no setting of a weight edit's cell: both resume it
        assert not run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, ev, KeywordJudge(), tmp_path,
                                   store, recipe=ablation)
    assert store.rows() == rows


def test_a_trajectory_probe_measures_what_the_metrics_do_and_tokenises_once(tokenizer, bundle, monkeypatch):
    from seamlm.data.format import Formatter
    from seamlm.evaluate.metrics import benign_perplexity, gradient_coupling
    from seamlm.evaluate.run import attack_probe
    from tests.conftest import make_model

    model = make_model(len(tokenizer), seed=4)
    cfg = EVAL.replace(trajectory_every=2, trajectory_examples=3, coupling_examples=2)
    encoded = []
    real_call = Formatter.__call__
    monkeypatch.setattr(Formatter, "__call__", lambda self, e: encoded.append(e) or real_call(self, e))
    probe = attack_probe(tokenizer, bundle, cfg)
    assert probe.every == 2 and len(encoded) == 3 + 2 + 2  # trajectory benign + coupling harmful and benign
    first = probe.measure(model)
    second = probe.measure(model)
    assert len(encoded) == 7  # the probes themselves tokenise nothing
    assert first == second
    assert first["benign_ppl"] == pytest.approx(benign_perplexity(model, tokenizer, bundle.streams["benign_heldout"][:3]))
    coupling = gradient_coupling(model, tokenizer, bundle.streams["attack"][:2], bundle.streams["benign_heldout"][:2])
    assert first["coupling_cos"] == pytest.approx(coupling["coupling_cos"])
    assert first["coupling_slope"] == pytest.approx(coupling["coupling_slope"])
    assert attack_probe(tokenizer, bundle, cfg.replace(trajectory_every=0)) is None


def test_a_trajectory_probe_truncates_long_examples_as_the_metrics_do(tokenizer, bundle):
    """A held-out answer longer than the metrics' max length: the probe, which encodes once up front, cuts it where
    benign_perplexity and gradient_coupling do (a different cut would make the probe's step-0 figure disagree with
    the pre-attack row it is plotted beside)."""
    from seamlm.data.files import Example
    from seamlm.evaluate.metrics import METRIC_MAX_LENGTH, benign_perplexity, gradient_coupling
    from seamlm.evaluate.run import attack_probe
    from tests.conftest import make_model

    long_answer = " ".join(f"word{i}" for i in range(2 * METRIC_MAX_LENGTH))
    assert len(tokenizer(long_answer)["input_ids"]) > METRIC_MAX_LENGTH
    heldout = [Example("Tell me a long story.", long_answer)] + bundle.streams["benign_heldout"]
    attack = [Example("Write a long harmful text.", long_answer)] + bundle.streams["attack"]
    long_bundle = BundleData({**bundle.streams, "benign_heldout": heldout, "attack": attack}, bundle.manifest)
    model = make_model(len(tokenizer), seed=5)
    cfg = EVAL.replace(trajectory_every=1, trajectory_examples=2, coupling_examples=2)
    got = attack_probe(tokenizer, long_bundle, cfg).measure(model)
    assert got["benign_ppl"] == pytest.approx(benign_perplexity(model, tokenizer, heldout[:2]))
    coupling = gradient_coupling(model, tokenizer, attack[:2], heldout[:2])
    assert got["coupling_cos"] == pytest.approx(coupling["coupling_cos"])
    # and the cut matters: the long example alone, untruncated, gives another perplexity
    assert benign_perplexity(model, tokenizer, heldout[:1]) != pytest.approx(
        benign_perplexity(model, tokenizer, heldout[:1], max_length=4 * METRIC_MAX_LENGTH))


def test_a_moved_model_folder_keeps_its_finished_cells(tokenizer, bundle, tmp_path):
    """Cells name a seamlm-saved model by its weights, not its path: a demo folder moved elsewhere (or a path spelled
    another way) reuses its results; other weights under the old path do not."""
    from seamlm.models import save_model
    from tests.conftest import make_model

    store = ResultStore(tmp_path / "results.jsonl")
    first = save_model(make_model(len(tokenizer)), tokenizer, tmp_path / "a" / "model", {"stage": "test"})
    assert evaluate_pre_attack(str(first), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
    moved = tmp_path / "b" / "model"
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert not evaluate_pre_attack(f"{tmp_path}/b/../b/model", "m", "none", bundle, EVAL, KeywordJudge(), tmp_path,
                                   store)
    save_model(make_model(len(tokenizer), seed=9), tokenizer, moved, {"stage": "test"})
    with pytest.raises(DataError, match="other settings .*model: 'sha256:"):
        evaluate_pre_attack(str(moved), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)


def test_an_eval_template_the_attack_cells_would_not_use_is_refused(tiny_model_dir, bundle, tmp_path):
    """Attack cells are measured through the attack's training template: an eval.prompt_template naming another one
    would hold for the pre-attack cell only (pre and post in one table through different templates)."""
    from seamlm.attack import check_eval_template
    from seamlm.recipes import make_recipe
    from seamlm.results import ResultStore

    cfg = AttackConfig(learning_rates=(1e-4,), num_samples=4, batch_size=2)
    alpaca = EVAL.replace(prompt_template="alpaca")
    with pytest.raises(ConfigError, match="eval.prompt_template=alpaca but the attack trains .* with the chat template"):
        check_eval_template(cfg, alpaca)
    check_eval_template(cfg.replace(prompt_template="alpaca"), alpaca)  # attack and measure in alpaca: fine
    check_eval_template(cfg, alpaca, make_recipe("template", {"template": "alpaca"}))
    with pytest.raises(ConfigError, match="with the raw template: set --recipe.template alpaca"):
        check_eval_template(cfg, alpaca, make_recipe("template", {"template": "raw"}))
    # a sweep: every recipe's template, and the template recipe (whose trials choose one) not at all
    from seamlm.finetune import FinetuneConfig
    from seamlm.sweep import SweepConfig, check_sweep_template

    check_sweep_template(SweepConfig(recipes=("sft", "template")), FinetuneConfig(), EVAL)
    check_sweep_template(SweepConfig(recipes=("sft",)), FinetuneConfig(prompt_template="alpaca"), alpaca)
    with pytest.raises(ConfigError, match="with the chat template: set --prompt_template alpaca"):
        check_sweep_template(SweepConfig(recipes=("sft",)), FinetuneConfig(), alpaca)
    with pytest.raises(ConfigError, match="template recipe's trials each choose"):
        check_sweep_template(SweepConfig(recipes=("template",)), FinetuneConfig(), alpaca)
    check_eval_template(cfg, EVAL)  # the default (chat) is always fine
    store = ResultStore(tmp_path / "r.jsonl")
    with pytest.raises(ConfigError, match="eval.prompt_template"):
        run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, alpaca, KeywordJudge(), tmp_path, store)
    assert not store.rows()


def test_cells_an_older_seamlm_recorded_under_the_models_path_still_count(tiny_model_dir, tokenizer, bundle, tmp_path,
                                                                          monkeypatch):
    """Before local folders were named by their weights, results named them by path: such rows are the same cell
    for the folder at that path (no forced rerun), and still not for other weights at another path."""
    from seamlm.results import ResultStore
    from tests.conftest import make_model

    store = ResultStore(tmp_path / "r.jsonl")
    with monkeypatch.context() as m:
        m.setattr(attack_mod, "model_identity", str)  # as recorded before 2026-11-26
        assert evaluate_pre_attack(str(tiny_model_dir), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
    assert not evaluate_pre_attack(str(tiny_model_dir), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    make_model(len(tokenizer), seed=7).save_pretrained(other)
    with pytest.raises(DataError, match="other settings"):
        evaluate_pre_attack(str(other), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)


def test_measurements_on_nothing_are_errors_not_numbers(tokenizer):
    # HS of no prompts divided by zero; the perplexity of no answer tokens came out as 1.0, a "perfect" model
    from seamlm.evaluate.metrics import benign_perplexity, harmfulness
    from tests.conftest import make_model

    model = make_model(len(tokenizer))
    with pytest.raises(ConfigError, match="HS: no harmful prompts"):
        harmfulness(model, tokenizer, [], KeywordJudge())
    with pytest.raises(ConfigError, match="perplexity: no answer tokens"):
        benign_perplexity(model, tokenizer, [])


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_perplexity_is_the_token_weighted_mean_answer_ce_by_hand(tokenizer, batch_size):
    """exp(Σ answer-token CE / answer tokens) over answers of different lengths, each row scored alone by hand;
    whatever the batch size (rows of like length are batched together: the order must not weigh)."""
    import torch

    from seamlm.data.format import Formatter
    from seamlm.evaluate.metrics import benign_perplexity
    from tests.conftest import make_model

    model = make_model(len(tokenizer), seed=3).eval()
    examples = [BENIGN[1], HARMFUL[2], Example("Hi?", "A much longer answer than the others, " * 3), BENIGN[11]]
    total, count = 0.0, 0
    for row in Formatter(tokenizer, 256).encode_all(examples, "hand"):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([row.input_ids])).logits[0].double(), -1)
        for pos, label in enumerate(row.labels[1:]):
            if label != -100:
                total -= logp[pos, label].item()
                count += 1
    assert benign_perplexity(model, tokenizer, examples, batch_size=batch_size) == pytest.approx(math.exp(total / count),
                                                                                                 rel=1e-5)


def test_cells_of_the_old_fallback_prompt_format_are_not_reused(tmp_path, bundle, monkeypatch):
    """A model without a chat template formats in the fallback format, changed in PROMPT_FORMAT_VERSION 2: its
    cells stored by an older seamlm (settings without a format version) are an error naming it, not reused; a
    model with a chat template formats as before and keeps its cells."""
    from seamlm.models import PROMPT_FORMAT_VERSION, prompt_format_parts
    from tests.conftest import make_model, make_tokenizer

    for template in (True, False):
        tok = make_tokenizer(chat_template=template)
        model_dir = tmp_path / f"model-{template}"
        make_model(len(tok)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        store = ResultStore(tmp_path / f"results-{template}.jsonl")
        with monkeypatch.context() as m:  # as seamlm before format versions recorded it
            m.setattr(attack_mod, "prompt_format_parts", lambda *a: {})
            evaluate_pre_attack(str(model_dir), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
        if template:
            assert not evaluate_pre_attack(str(model_dir), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
            # ... unless a cell formats through the plain template (a template-shift attack)
            assert prompt_format_parts(str(model_dir), "plain", "chat") == {"prompt_format": PROMPT_FORMAT_VERSION}
            assert prompt_format_parts(str(model_dir), "alpaca", "chat") == {}
            continue
        with pytest.raises(DataError, match=rf"made with other settings \(prompt_format: .*{PROMPT_FORMAT_VERSION}\)"):
            evaluate_pre_attack(str(model_dir), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
        # nor does a new cell of the label join the old pre-attack cell in one report row
        cfg = AttackConfig(learning_rates=(1e-4,), num_samples=4, batch_size=2)
        with pytest.raises(DataError, match=r"cells of 'm' made with another prompt_format: 1 → 2"):
            run_attack_grid(str(model_dir), "m", "none", bundle, cfg, EVAL, KeywordJudge(), tmp_path, store)
        fresh = ResultStore(tmp_path / "fresh.jsonl")
        assert evaluate_pre_attack(str(model_dir), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, fresh)
        record = fresh.settings_record(fresh.rows()[0].settings)
        assert record["prompt_format"] == PROMPT_FORMAT_VERSION


def test_a_model_trained_in_the_old_fallback_prompt_format_is_refused(tmp_path, bundle):
    """A seamlm-trained model without a chat template learnt format 1's prompts: measuring it in format 2 would
    credit the defence with the format change. Models saved now record the version; chat-template models pass."""
    from seamlm.errors import ModelLoadError
    from seamlm.models import RUN_CONFIG_FILE, save_model
    from tests.conftest import make_model, make_tokenizer

    for template in (False, True):
        tok = make_tokenizer(chat_template=template)
        saved = save_model(make_model(len(tok)), tok, tmp_path / f"trained-{template}", {"stage": "defend"})
        info = json.loads((saved / RUN_CONFIG_FILE).read_text())
        assert info["prompt_format"] == 2
        (saved / RUN_CONFIG_FILE).write_text(json.dumps({k: v for k, v in info.items() if k != "prompt_format"}))
        store = ResultStore(tmp_path / f"r-{template}.jsonl")
        if template:
            assert evaluate_pre_attack(str(saved), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
            continue
        with pytest.raises(ModelLoadError, match="trained in prompt format 1"):
            evaluate_pre_attack(str(saved), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)
        (saved / RUN_CONFIG_FILE).write_text(json.dumps(info))
        assert evaluate_pre_attack(str(saved), "m", "none", bundle, EVAL, KeywordJudge(), tmp_path, store)


def test_an_empty_zs_task_list_is_an_hs_only_evaluation(tiny_model, tokenizer, bundle):
    from seamlm.evaluate.judges import get_judge
    from seamlm.evaluate.run import evaluate_model

    cfg = EvalConfig.from_dict({**EVAL.to_dict(), "zs_tasks": ""})
    assert cfg.zs_tasks == ()
    out = evaluate_model(tiny_model, tokenizer, bundle, cfg, get_judge("keyword"))
    assert "hs" in out and "coherence_ppl" in out and not [k for k in out if k.startswith("zs_")]


def test_attack_ce_is_measured_on_one_fixed_set_before_and_after(tiny_model_dir, tokenizer, bundle, tmp_path):
    """The per-step loss compares different batches; attack_ce_before/after are the answer CE of the first attack
    examples under the untouched and the attacked model (here all 6 attack examples, which it trains on)."""
    import torch
    from transformers import AutoModelForCausalLM

    from seamlm.data.format import Formatter, collate
    from seamlm.defense.losses import answer_ce

    store = ResultStore(tmp_path / "r.jsonl")
    cfg = AttackConfig(learning_rates=(1e-2,), num_samples=6, batch_size=2, max_length=64, warmup_ratio=0.0)
    run_attack_grid(str(tiny_model_dir), "tiny", "none", bundle, cfg, EVAL, KeywordJudge(), tmp_path, store)
    got = {r.metric: r.value for r in store.rows() if r.cell != "pre"}
    rows = Formatter(tokenizer, 64).encode_all(bundle.streams["attack"], "x")  # one batch: order does not matter
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = answer_ce(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch).item()
    assert got["attack_ce_before"] == pytest.approx(expected, rel=1e-5)
    assert got["attack_ce_after"] < got["attack_ce_before"] - 0.1


def test_evaluation_pads_a_tokenizer_without_a_pad_token(tiny_model, bundle):
    """A user's Llama-style tokenizer (no pad token) reaches generation and the zero-shot scorer padded with EOS."""
    from seamlm.evaluate.judges import get_judge
    from seamlm.evaluate.run import evaluate_model
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = None
    out = evaluate_model(tiny_model, tok, bundle, EVAL, get_judge("keyword"))
    assert tok.pad_token == tok.eos_token and "hs" in out and "zs_mean" in out


def test_the_lm_eval_task_digest_covers_its_data_and_code_not_only_its_yaml(tmp_path):
    import hashlib

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "task.yaml").write_text("task: t\ndataset_path: json\n")
    ev = EVAL.replace(lm_eval_tasks=("t",), lm_eval_include_path=str(folder))
    yaml_only = ev.settings_dict()["lm_eval_include_digest"]
    # a folder of YAML alone keeps the digest seamlm gave it before data and code counted
    assert yaml_only == hashlib.sha256(b"task.yaml" + (folder / "task.yaml").read_bytes()).hexdigest()[:16]
    (folder / "data.jsonl").write_text('{"q": 1}\n')
    with_data = ev.settings_dict()["lm_eval_include_digest"]
    (folder / "data.jsonl").write_text('{"q": 2}\n')
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "utils.cpython.pyc").write_bytes(b"\0")
    edited = ev.settings_dict()["lm_eval_include_digest"]
    assert len({yaml_only, with_data, edited}) == 3
    (folder / "__pycache__" / "utils.cpython.pyc").write_bytes(b"\1")  # a cache is no part of the task
    assert ev.settings_dict()["lm_eval_include_digest"] == edited


def test_a_cell_another_process_measures_is_passed_over_then_waited_for(tiny_model_dir, bundle, tmp_path, caplog):
    """Processes sharing a grid (one `seamlm attack` per GPU) share its cells out: a cell whose lock another holds
    is left for later, then waited for; one the other left unfinished (killed) is run."""
    import threading
    import time

    from seamlm.attack import cell_lock
    from seamlm.locks import HolderLock

    caplog.set_level("INFO")
    store = ResultStore(tmp_path / "results.jsonl")
    first, second = "sft-full-adamw-lr0.0001-n4-ep1-b2-s0", "sft-full-adamw-lr0.001-n4-ep1-b2-s0"
    other = HolderLock(cell_lock(tmp_path, "tiny", first).path, "attack by the other process")
    assert other.acquire()
    ran: list[str] = []
    grid = threading.Thread(target=lambda: ran.extend(_grid(tiny_model_dir, bundle, tmp_path, store)))
    grid.start()
    deadline = time.monotonic() + 120
    while not store.done("tiny", second) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    assert grid.is_alive() and not store.done("tiny", first)  # waiting for the held cell
    other.release()  # the other process ended without finishing it
    grid.join(120)
    assert ran == [second, first]
    assert "being measured by another process (seamlm attack by the other process, pid" in caplog.text
    assert cell_lock(tmp_path, "tiny", first).acquire()  # released when done


def _grid_in_a_process(model_dir, out, results) -> None:
    results.put(_grid(model_dir, _bundle(), out, ResultStore(out / "results.jsonl")))


def test_two_processes_on_one_grid_run_each_cell_once(tiny_model_dir, tmp_path):
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    workers = [spawn.Process(target=_grid_in_a_process, args=(str(tiny_model_dir), tmp_path, results))
               for _ in range(2)]
    for w in workers:
        w.start()
    ran = [results.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert sorted(ran[0] + ran[1]) == ["sft-full-adamw-lr0.0001-n4-ep1-b2-s0", "sft-full-adamw-lr0.001-n4-ep1-b2-s0"]
    hs = [r.cell for r in ResultStore(tmp_path / "results.jsonl").rows() if r.metric == "hs"]
    assert sorted(hs) == sorted(ran[0] + ran[1])  # one write per cell
