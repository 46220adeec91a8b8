"""`seamlm demo`: data -> align -> defend (SEAM) -> attack both models -> evaluate -> report.

The pipeline only orchestrates the stages; each stage reads and writes files under ``out`` and is skipped when its
output exists (``fresh=True`` redoes everything), so a killed demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from seamlm.attack import AttackConfig, evaluate_pre_attack, run_attack_grid
from seamlm.checkpoint import latest_checkpoint
from seamlm.config import BaseConfig
from seamlm.data.bundles import OFFLINE_DEFAULT_ZS_EXCLUDE, build_bundle, load_built
from seamlm.defense import DefenseConfig, RefusalSFT, SEAMTrainer
from seamlm.errors import ConfigError
from seamlm.evaluate.metrics import EvalConfig
from seamlm.finetune import LOOP_VERSION, FinetuneConfig, warmup_steps
from seamlm.jsonl import write_text_atomic
from seamlm.models import (
    PROMPT_FORMAT_VERSION,
    is_saved_model,
    load_model,
    model_identity,
    resolve_model_source,
    save_model,
    saved_run_config,
    stale_trained_format,
)
from seamlm.report import write_report
from seamlm.results import ResultRow, ResultStore
from seamlm.runinfo import LOCK_FILE, StageClock, folder_lock

log = logging.getLogger(__name__)


@dataclass
class DemoConfig(BaseConfig):
    """Settings of the whole demo; presets (``PRESETS``) fill them, ``--key value`` overrides."""

    model: str = "smollm2-135m-instruct"
    """The raw chat model (not safety-aligned)."""
    data_seed: int = 0
    """Split seed of the offline-default bundle."""
    align_steps: int = 40
    """Refusal + benign SFT steps that make the undefended aligned baseline."""
    align_lr: float = 5e-5
    """Alignment learning rate."""
    align_batch_size: int = 8
    """Alignment batch size."""
    defense_steps: int = 50
    """SEAM steps on the aligned model."""
    defense_beta: float = 10.0
    """β of SEAM. The paper's 0.01 leaves cos(g_a, g_b) untouched at this scale; with β = 10 the coupling term
    dominates the update (docs/demo-tuning.md)."""
    defense_lr: float = 2e-4
    """SEAM learning rate."""
    defense_batch_size: int = 4
    """SEAM batch per stream."""
    defense_unlearn_loss: Literal["logit_lens", "final_layer"] = "final_layer"
    """L_ul variant (final_layer is 1.6-2x cheaper per step on CPU)."""
    defense_epsilon: float = 1e-3
    """ε of the Hessian-free estimate."""
    defense_lookahead_lr: float = 0.0
    """Take L_sd where a simulated attacker's first AdamW updates at this lr land (``DefenseConfig.lookahead_lr``,
    not in the paper); 0 = at θ, as in the paper."""
    defense_lookahead_steps: int = 1
    """Simulated attacker updates of the look-ahead (``DefenseConfig.lookahead_steps``)."""
    defense_lookahead_weight: float = 1.0
    """Share of L_sd taken at the look-ahead point, the rest at θ (``DefenseConfig.lookahead_weight``)."""
    max_length: int = 128
    """Token budget per example in every training stage."""
    truncate_first: Literal["answer", "prompt"] = "answer"
    """What a longer training example loses first, in every training stage: the answer's end (``answer``, down to 8
    tokens) or the prompt's start, down to half of ``max_length`` (``prompt``; ``FinetuneConfig.truncate_first``)."""
    attack_lrs: tuple[float, ...] = (5e-5, 2e-4)
    """Attack learning rates."""
    attack_samples: int = 120
    """Harmful examples per attack."""
    attack_lora: bool = False
    """Add a LoRA attack at the highest learning rate × 10."""
    hs_prompts: int = 32
    """HS prompts per evaluation."""
    zs_limit: int = 60
    """Zero-shot items per task."""
    zs_tasks: tuple[str, ...] = ("arc_easy", "sciq")
    """Zero-shot tasks: the ones SmolLM2-135M is clearly above chance on (docs/demo-tuning.md), so a fall to
    chance shows."""
    fs: bool = True
    """Measure FS for the unattacked aligned and SEAM models."""
    fs_steps: int = 20
    """FS fine-tuning steps (batch 8) on SST-2."""
    fs_train: int = 160
    """SST-2 sentences FS trains on."""
    fs_test: int = 80
    """SST-2 sentences FS is scored on."""
    judge: str = "minilm"
    """Harmfulness judge."""
    judge_model: str = ""
    """The judge's model (``EvalConfig.judge_model``: e.g. a local copy of the BeaverTails classifier)."""
    coupling_examples: int = 8
    """Attack and benign examples for the gradient-coupling figures."""
    trajectory_every: int = 0
    """Probe each attack every N steps (benign perplexity, gradient coupling: ``EvalConfig.trajectory_every``);
    0 = off. 10 adds ≈ 7 min to the quick preset on 2 CPU cores (the coupling's backward passes)."""
    baseline_from: str = ""
    """A finished demo directory whose data, aligned model and raw/aligned results are reused (its settings must
    match in everything but ``defense_*``): try other SEAM settings without redoing the baseline."""

    @staticmethod
    def is_defense_key(key: str) -> bool:
        return key.startswith("defense_") or key == "baseline_from"

    def validate(self) -> None:
        # build every stage's config now, so a bad value fails before the first stage runs (and before
        # demo_config.json pins the directory to it), not after alignment and SEAM have spent their minutes
        fed = sorted(set(self.zs_tasks) & set(OFFLINE_DEFAULT_ZS_EXCLUDE))
        self._require([(self.align_steps >= 1, "align_steps must be >= 1"),
                       (not fed, f"zs_tasks {fed} feed the offline-default bundle's training data (PIQA rows are "
                                 "benign training examples): drop them from zs_tasks")])
        self.align_config()
        self.defense_config("unused")
        self.attack_grids()
        self.demo_eval_config().replace(fs=self.fs)

    def length_fields(self) -> dict[str, Any]:
        """The token budget and truncation every training stage (and an adaptive attack on the demo) uses."""
        return {"max_length": self.max_length, "truncate_first": self.truncate_first}

    def align_config(self) -> FinetuneConfig:
        """The refusal + benign SFT that makes the undefended aligned baseline."""
        return FinetuneConfig(lr=self.align_lr, batch_size=self.align_batch_size, max_steps=self.align_steps,
                              epochs=100, weight_decay=0.0, seed=self.data_seed, **self.length_fields())

    def defense_config(self, output_dir: str | Path) -> DefenseConfig:
        """SEAM on the aligned model, with five checkpoints over the run."""
        return DefenseConfig(steps=self.defense_steps, beta=self.defense_beta, lr=self.defense_lr,
                             epsilon=self.defense_epsilon, lookahead_lr=self.defense_lookahead_lr,
                             lookahead_steps=self.defense_lookahead_steps,
                             lookahead_weight=self.defense_lookahead_weight, batch_size=self.defense_batch_size,
                             unlearn_loss=self.defense_unlearn_loss, **self.length_fields(),
                             output_dir=str(output_dir), checkpoint_every=max(1, self.defense_steps // 5),
                             seed=self.data_seed)

    def attack_grids(self) -> list[AttackConfig]:
        """Full-parameter SFT at every attack lr, and with ``attack_lora`` a LoRA attack at 10x the highest."""
        attack = AttackConfig(learning_rates=self.attack_lrs, num_samples=(self.attack_samples,),
                              **self.length_fields())
        if not self.attack_lora:
            return [attack]
        return [attack, attack.replace(lora=True, learning_rates=[max(self.attack_lrs) * 10])]

    def demo_eval_config(self) -> EvalConfig:
        """:meth:`eval_config` with the demo's FS sizes (FS itself is switched on per model)."""
        return self.eval_config().replace(fs_steps=self.fs_steps, fs_train=self.fs_train, fs_test=self.fs_test)

    def eval_config(self) -> EvalConfig:
        """The evaluation of every demo cell (HS, ZS, coherence, coupling; FS is switched on per model). Adaptive
        attacks on the demo's models reuse it so their numbers compare."""
        return EvalConfig(judge=self.judge, judge_model=self.judge_model, hs_prompts=self.hs_prompts,
                          zs_limit=self.zs_limit, zs_tasks=self.zs_tasks, coherence_examples=50,
                          coupling_examples=self.coupling_examples, trajectory_every=self.trajectory_every,
                          fs=False)


#: ``quick`` = the DemoConfig defaults (≤ 30 min on 2 CPU cores); ``full`` = the paper's lr grid, every attack
#: example (the seed-0 bundle holds 165), a LoRA attack, more SEAM steps and larger evaluations.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": {"attack_lrs": (2e-5, 5e-5, 8e-5, 1e-4, 2e-4), "attack_samples": 1000, "attack_lora": True,
             "defense_steps": 100, "hs_prompts": 100, "zs_limit": 200, "zs_tasks": ("arc_easy", "sciq", "hellaswag"),
             "fs_steps": 60, "fs_train": 400, "fs_test": 200, "coupling_examples": 16},
}


def demo_paths(out_dir: str | Path, cfg: DemoConfig) -> dict[str, Path]:
    """Where a demo keeps its data and models: the data and the aligned model live in the ``baseline_from`` demo
    when it reuses one, the SEAM model always in its own folder."""
    out = Path(out_dir)
    base = baseline_folder(out, cfg.baseline_from) if cfg.baseline_from else out
    return {"data": base / "data", "aligned": base / "models" / "aligned", "seam_run": out / "models" / "seam",
            "seam": out / "models" / "seam" / "model"}


def _rebased(row: ResultRow, base: Path, out: Path) -> ResultRow:
    """``row`` of the ``base`` demo with its log paths (relative to its results file) made relative to ``out``'s,
    so this demo's report still finds the baseline's attack curves."""
    moved = {k: os.path.relpath(base / row.attack[k], out) for k in ("loss_log", "probe_log") if row.attack.get(k)}
    return dataclasses.replace(row, attack={**row.attack, **moved}) if moved else row


def _banner(text: str) -> None:
    log.info("=" * 20 + f" {text} " + "=" * 20)


def baseline_folder(out: Path, baseline_from: str) -> Path:
    """The folder ``baseline_from`` names: as given (from where the demo was started), else — a relative path, the
    demo resumed from another folder — beside the demo's ``--out``, where a relative path is found again."""
    given = Path(baseline_from)
    beside = out.parent / given
    if not given.is_absolute() and not (given / "demo_config.json").is_file() and (beside / "demo_config.json").is_file():
        return beside
    return given


def _check_baseline(cfg: DemoConfig, out: Path) -> Path:
    base = baseline_folder(out, cfg.baseline_from)
    if base.resolve() == out.resolve() or out.resolve() in base.resolve().parents:
        raise ConfigError(f"baseline_from={base} is --out itself or inside it: the run would reuse (and --fresh "
                          "delete) its own baseline; give another --out")
    if base.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} is inside baseline_from={base}: --fresh would delete part of the baseline; "
                          "give an --out outside it")
    saved = base / "demo_config.json"
    theirs_base = json.loads(saved.read_text()).get("baseline_from") if saved.is_file() else None
    if theirs_base:
        raise ConfigError(f"baseline_from={base} reuses the aligned model of {theirs_base} itself: give "
                          f"baseline_from={theirs_base}")
    if not saved.is_file() or not is_saved_model(base / "models" / "aligned"):
        raise ConfigError(f"baseline_from={base}: not a demo directory with a finished alignment stage "
                          f"(run `seamlm demo --out {base}` first)")
    theirs = json.loads(saved.read_text())
    changed = [k for k in cfg.changed_from(theirs) if not cfg.is_defense_key(k)]
    if changed:
        rejudge = (f" (the baseline was rescored since: `seamlm rescore {out} --judge {theirs.get('judge')}` moves this "
                   "demo to its judge too)" if set(changed) <= {"judge", "judge_model"} else "")
        raise ConfigError(f"baseline_from={base} was run with other settings ({', '.join(changed)}): only the "
                          f"defense_* settings may differ from the baseline's{rejudge}")
    return base


def _check_stage(model_dir: Path, key: str, now: BaseConfig, stage: str, ignore: tuple[str, ...] = (),
                 baseline: Path | None = None) -> None:
    """A finished stage is reused only if its saved model was trained with the configuration this code would use
    now: the demo's own settings are pinned by ``demo_config.json``, but the stage's constants and the defaults of
    its config class (and the training loop's version) can change with seamlm."""
    info = saved_run_config(model_dir) or {}
    changed = {k: v for k, v in now.changed_from(info.get(key) or {}).items() if k not in ignore}
    if stage == "align" and "loop" not in info:
        log.warning("%s was aligned by a seamlm that did not record its training loop's version: reused unverified "
                    "(this seamlm's loop is version %s; --fresh retrains it)", model_dir, LOOP_VERSION)
    elif info.get("loop", LOOP_VERSION) != LOOP_VERSION:  # recorded by the fine-tuning stage (align)
        changed["training loop version"] = (info.get("loop"), LOOP_VERSION)
    if stage == "defend":  # (``now`` is the DefenseConfig)
        expected, before = warmup_steps(now.warmup_ratio, now.steps), int(now.warmup_ratio * now.steps)
        if "warmup_steps" in info and info["warmup_steps"] != expected:
            changed["warm-up steps"] = (info["warmup_steps"], expected)
        elif "warmup_steps" not in info and expected != before:
            log.warning("%s does not record its warm-up (older seamlm): made before 2026-11-27 it warmed up for %d "
                        "steps, this seamlm for %d; reused unverified (--fresh retrains it)", model_dir, before,
                        expected)
    trained_format = stale_trained_format(model_dir)
    if trained_format is not None:
        changed["prompt format version (a model without a chat template)"] = (trained_format, PROMPT_FORMAT_VERSION)
    if changed:
        what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in list(changed.items())[:6])
        fix = (f"redo the baseline first (seamlm demo --out {baseline} --fresh), or drop --baseline_from" if baseline
               else "rerun with --fresh, or choose another --out")
        raise ConfigError(f"{model_dir} ({stage} stage) was trained with another configuration than this seamlm "
                          f"would use ({what}): {fix}")


def _cli_value(value: Any) -> str:
    """A config value as a shell command line takes it (lists comma-separated, an empty one quoted)."""
    return shlex.quote(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))


#: what a demo folder holds before any stage has finished
_NOT_STARTED = {"demo_config.json", "timings.jsonl", LOCK_FILE}
#: the mark of a folder of several data seeds' demos (``seamlm demo --seeds``)
SEEDS_FILE = "seeds.json"


def check_demo_folder(out: Path, cfg: DemoConfig, fresh: bool) -> Path:
    """Every check of a demo's --out before anything is written or deleted (a refused command leaves it as it was);
    returns the folder whose aligned model the demo uses (its own, or ``baseline_from``)."""
    if (fresh and not cfg.baseline_from) or not is_saved_model(demo_paths(out, cfg)["aligned"]):
        resolve_model_source(cfg.model)  # a mistyped --model fails here, before --out is written (or --fresh empties it)
    if (out / SEEDS_FILE).is_file() or any(out.glob("seed-*/demo_config.json")):  # (older ones lack seeds.json)
        raise ConfigError(f"{out} holds the demos of several data seeds (seamlm demo --seeds): rerun that command, "
                          "or choose another --out")
    saved = out / "demo_config.json"
    if fresh and out.exists() and not saved.is_file() and (
            not out.is_dir() or any(p.name not in _NOT_STARTED for p in out.iterdir())):
        raise ConfigError(f"--fresh empties --out, and {out} holds no demo run (no demo_config.json): choose another "
                          "--out (or empty that folder yourself)")
    paths = demo_paths(out, cfg)
    if saved.is_file() and not fresh:
        changed = cfg.changed_from(json.loads(saved.read_text()))
        started = any(p.name not in _NOT_STARTED for p in out.iterdir())
        if changed and started:
            keep = " ".join(f"--{k} {_cli_value(then)}" for k, (then, _) in changed.items())
            rejudge = (f" Only the judge differs: `seamlm rescore {out} --judge {cfg.judge}` moves the run to it "
                       "from its saved answers in seconds (a demo on a baseline: rescore the baseline first)."
                       if set(changed) <= {"judge", "judge_model"} else "")
            raise ConfigError(f"{out} holds a demo run with other settings "
                              f"({', '.join(f'{k}: {a!r} → {b!r}' for k, (a, b) in changed.items())}): its finished "
                              f"stages would be reused. To go on with that run, give its settings ({keep}); to redo "
                              f"everything with these, pass --fresh; or choose another --out.{rejudge}")
        if changed:
            log.warning("%s: the demo begun there with other settings (%s) wrote nothing yet; starting over with "
                        "these", out, ", ".join(changed))
    base = _check_baseline(cfg, out) if cfg.baseline_from else out
    # finished stages that survive this command (a baseline's always; this folder's unless --fresh) must be what
    # this seamlm would train
    if is_saved_model(paths["aligned"]) and (cfg.baseline_from or not fresh):
        _check_stage(paths["aligned"], "config", cfg.align_config(), "align", baseline=base if cfg.baseline_from else None)
    if is_saved_model(paths["seam"]) and not fresh:
        _check_stage(paths["seam"], "defense_config", cfg.defense_config(paths["seam_run"]), "defend",
                     ignore=("output_dir",))
    if not fresh:
        check_seam_base(paths)
    return base


_REDEFEND = "rerun with --fresh to defend the new one, or choose another --out"


def check_seam_base(paths: dict[str, Path], fix: str = _REDEFEND) -> None:
    """A SEAM model (or its checkpoints) is reused only on top of the aligned model it was trained from: a baseline
    redone since (``seamlm demo --out BASE --fresh``), or an aligned model deleted and trained again, may be
    another one."""
    if is_saved_model(paths["seam"]):
        record, what = saved_run_config(paths["seam"]) or {}, "SEAM model"
    elif latest_checkpoint(paths["seam_run"] / "checkpoints") is not None and (paths["seam_run"] / "run.json").is_file():
        record, what = json.loads((paths["seam_run"] / "run.json").read_text(encoding="utf-8")), "killed SEAM run"
    else:
        return
    if not is_saved_model(paths["aligned"]):
        return
    if "base_identity" not in record:
        log.warning("%s: the %s does not record which aligned model it started from (older seamlm): reused "
                    "unverified; --fresh retrains it", paths["seam_run"], what)
    elif record["base_identity"] != model_identity(paths["aligned"]):
        raise ConfigError(f"{paths['seam_run']}: the {what} there started from another aligned model than "
                          f"{paths['aligned']} holds now (it was trained again since): {fix}")


def run_demo(out_dir: str | Path, cfg: DemoConfig, fresh: bool = False, checked: bool = False) -> Path:
    """Run (or resume) every stage; returns the report's Markdown path. ``checked``: :func:`check_demo_folder`
    has passed already (the seeds' loop checks every folder first)."""
    out = Path(out_dir)
    base = out if checked and not cfg.baseline_from else check_demo_folder(out, cfg, fresh)
    with folder_lock(out, "demo"):
        clock = StageClock(out / "timings.jsonl")
        with clock.charging_interruptions():
            return _run_stages(out, cfg, base, fresh, clock)


def _run_stages(out: Path, cfg: DemoConfig, base: Path, fresh: bool, clock: StageClock) -> Path:
    paths = demo_paths(out, cfg)
    saved = out / "demo_config.json"
    judge = cfg.eval_config().make_judge()  # a judge that cannot load (no Hub) fails before any training
    if fresh:
        for child in out.iterdir():  # everything but the lock this command holds
            if child.name != LOCK_FILE:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    write_text_atomic(saved, json.dumps(cfg.to_dict(), indent=2))
    clock.lap("judge")

    _banner("1/6 data")
    data_dir = paths["data"]
    if not (data_dir / "manifest.json").is_file():
        build_bundle("offline-default", seed=cfg.data_seed).write(data_dir)
    bundle = load_built(data_dir)
    clock.lap("data")

    _banner("2/6 align (refusal + benign SFT)")
    aligned = paths["aligned"]
    align_cfg = cfg.align_config()
    if not is_saved_model(aligned):
        model, tok = load_model(cfg.model, dtype="float32")
        aligner = RefusalSFT(align_cfg)
        streams = aligner.examples({k: bundle.streams[k] for k in aligner.streams})
        tuned, examples = aligner.fit(model, tok, streams, out / "logs" / "align.jsonl", desc="align")
        save_model(tuned, tok, aligned, {"stage": "align", "config": align_cfg.to_dict(), "base": cfg.model,
                                             "loop": LOOP_VERSION},
                   trained_prompts=[e.prompt for e in examples])
        check_seam_base(paths)  # a SEAM stage kept from before must sit on this very model
    clock.lap("align")

    _banner("3/6 defend (SEAM)")
    seam = paths["seam_run"]
    if not is_saved_model(paths["seam"]):
        model, tok = load_model(str(aligned), dtype="float32")
        trainer = SEAMTrainer(model, tok, cfg.defense_config(seam), harmful=bundle.streams["harmful"],
                              refusal=bundle.streams["refusal"], benign=bundle.streams["benign"],
                              run_info={"model": str(aligned), "base_identity": model_identity(aligned)})
        trainer.train(resume=latest_checkpoint(seam / "checkpoints") is not None)
    if (seam / "checkpoints").is_dir() and is_saved_model(paths["seam"]):
        # only a killed SEAM stage resumes from them; a finished one is skipped (they hold ≈ 3 parameter copies each)
        shutil.rmtree(seam / "checkpoints")
    clock.lap("defend")

    store = ResultStore(out / "results.jsonl")
    if cfg.baseline_from and not store.path.exists():
        base_store = ResultStore(base / "results.jsonl")
        if base_store.settings_dir.is_dir():  # the copied rows' settings records, for a later mismatch message
            shutil.copytree(base_store.settings_dir, store.settings_dir, dirs_exist_ok=True)
        store.append([_rebased(r, base, out) for r in base_store.rows() if r.model in ("raw", "aligned")])
    eval_cfg = cfg.demo_eval_config()
    models = {"raw": (cfg.model, "none"), "aligned": (str(aligned), "none"), "seam": (str(paths["seam"]), "seam")}

    _banner("4/6 evaluate before attack")
    for label, (path, defense) in models.items():
        fs_cfg = eval_cfg.replace(fs=cfg.fs and label != "raw")
        evaluate_pre_attack(path, label, defense, bundle, fs_cfg, judge, out, store)
    clock.lap("evaluate")

    _banner("5/6 attack and evaluate")
    for label in ("aligned", "seam"):
        path, defense = models[label]
        for grid in cfg.attack_grids():
            run_attack_grid(path, label, defense, bundle, grid, eval_cfg, judge, out, store)
    clock.lap("attack")

    _banner("6/6 report")
    report = write_report(store.path, out / "report")
    clock.lap("report")
    # seconds per stage over every invocation: a killed and resumed demo reports what it really cost
    (out / "timings.json").write_text(json.dumps(StageClock.totals(clock.path), indent=2))
    return report


def run_demo_seeds(out_dir: str | Path, cfg: DemoConfig, seeds: list[int], fresh: bool = False) -> Path:
    """The demo once per data seed (its splits, alignment and SEAM seeds: ``out/seed-<s>``), then the report across
    them (``out/report``: mean ± sd per cell, the bar run by run). Returns that report's Markdown path."""

    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be two or more different numbers, got {seeds}")
    if cfg.baseline_from:
        raise ConfigError("baseline_from reuses one demo's aligned model, which belongs to one data seed: run the "
                          "seeds without it")
    out = Path(out_dir)
    if (out / "demo_config.json").is_file():
        raise ConfigError(f"{out} holds a single demo run: give the seeds another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder")
    for seed in seeds:  # every seed's folder before the first runs (one seed's demo takes ~25 minutes)
        check_demo_folder(out / f"seed-{seed}", cfg.replace(data_seed=seed), fresh)
    with folder_lock(out, "demo --seeds"):  # (each seed's folder has its own lock besides)
        return _run_seeds(out, cfg, seeds, fresh)


def _run_seeds(out: Path, cfg: DemoConfig, seeds: list[int], fresh: bool) -> Path:
    from seamlm.across_runs import write_across_runs_report

    write_text_atomic(out / SEEDS_FILE, json.dumps({"seeds": seeds}))
    runs = []
    for i, seed in enumerate(seeds):
        _banner(f"data seed {seed} ({i + 1} of {len(seeds)})")
        run_demo(out / f"seed-{seed}", cfg.replace(data_seed=seed), fresh=fresh, checked=True)
        runs.append(out / f"seed-{seed}" / "results.jsonl")
    return write_across_runs_report(runs, out / "report")
