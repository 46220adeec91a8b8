"""``seamlm sweep``: an Optuna study over an attack recipe's knobs (and the fine-tuning hyper-parameters),
maximising HS. The study lives in SQLite, so a killed sweep resumes: finished trials are kept, a trial that was
running when the process died or stopped (Ctrl-C, out of memory) is marked failed and its parameters are tried
again first (once), and a trial whose cell is already in the results file is read back, not retrained. Selection
under a utility bound is :mod:`seamlm.selection`'s job (the report), not the objective's: the sweep records HS, ZS
and perplexity per trial.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Collection, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamlm.attack import attack_cell, check_eval_template, manifest_digest
from seamlm.config import BaseConfig
from seamlm.data.bundles import BundleData
from seamlm.errors import ConfigError, DataError
from seamlm.evaluate.judges import Judge
from seamlm.evaluate.metrics import EvalConfig
from seamlm.finetune import LOOP_VERSION, FinetuneConfig
from seamlm.locks import holding
from seamlm.models import check_trained_format, legacy_identities, model_identity, prompt_format_parts
from seamlm.recipes import RECIPES, make_recipe
from seamlm.results import ResultStore, flatten
from seamlm.runinfo import fingerprint, path_part

log = logging.getLogger(__name__)


@dataclass
class SweepConfig(BaseConfig):
    """The search. Fixed fine-tuning fields (max_length, weight_decay, lora …) come from the attack config."""

    recipes: tuple[str, ...] = ("sft",)
    """Recipes to search over; with several, the recipe is itself a parameter of the search."""
    trials: int = 20
    """Finished trials wanted in the study (a resumed sweep runs only the missing ones)."""
    num_samples: int = 1000
    """Harmful examples per trial (the same budget as the plain attack; all available when fewer)."""
    lr_min: float = 1e-5
    """Smallest AdamW learning rate searched (log scale); SGD searches 100× this range."""
    lr_max: float = 1e-3
    """Largest AdamW learning rate searched."""
    optimizers: tuple[str, ...] = ("adamw", "sgd")
    """Optimizers searched."""
    batch_sizes: tuple[int, ...] = (2, 4, 8)
    """Batch sizes searched."""
    max_epochs: int = 2
    """Epochs searched: 1 … max_epochs (longer, lower-lr runs)."""
    clip_norms: tuple[float, ...] = (0.0, 1.0, 0.1)
    """Gradient-clipping max norms searched (0 = no clipping)."""
    startup_trials: int = 8
    """Random trials before TPE starts modelling the objective."""
    seed: int = 0
    """Sampler seed and the attack's data-order seed."""
    study_name: str = ""
    """Optuna study name (default: the model label); one study per model and recipe set."""

    def validate(self) -> None:
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise ConfigError(f"sweep: unknown recipes {unknown}; known: {', '.join(RECIPES)}")
        bad_opt = [o for o in self.optimizers if o not in ("adamw", "sgd")]
        self._require([
            (bool(self.recipes), "recipes must name at least one recipe"), (self.trials >= 1, "trials must be >= 1"),
            (self.num_samples >= 1, "num_samples must be >= 1"),
            (0 < self.lr_min <= self.lr_max, "need 0 < lr_min <= lr_max"),
            (not bad_opt and bool(self.optimizers), f"optimizers must be adamw/sgd, got {list(self.optimizers)}"),
            (bool(self.batch_sizes) and min(self.batch_sizes) >= 1, "batch_sizes must be >= 1"),
            (self.max_epochs >= 1, "max_epochs must be >= 1"),
            (bool(self.clip_norms) and min(self.clip_norms) >= 0, "clip_norms must be >= 0"),
            (self.startup_trials >= 0, "startup_trials must be >= 0"),
        ])


def suggest_training(trial: Any, cfg: SweepConfig) -> dict[str, Any]:
    """Fine-tuning hyper-parameters of one trial: the "hardened plain SFT" space."""
    opt = trial.suggest_categorical("optimizer", list(cfg.optimizers))
    scale = 1.0 if opt == "adamw" else 100.0
    lr = trial.suggest_float(f"lr_{opt}", cfg.lr_min * scale, cfg.lr_max * scale, log=True)
    clip = trial.suggest_categorical("max_grad_norm", list(cfg.clip_norms))
    return {"optimizer": opt, "lr": lr, "max_grad_norm": clip or None,
            "lr_scheduler": trial.suggest_categorical("lr_scheduler", ["cosine", "constant_with_warmup"]),
            "warmup_ratio": trial.suggest_categorical("warmup_ratio", [0.0, 0.1, 0.3]),
            "batch_size": trial.suggest_categorical("batch_size", list(cfg.batch_sizes)),
            "epochs": trial.suggest_int("epochs", 1, cfg.max_epochs)}


def quiet_optuna() -> Any:
    """Optuna with its per-trial INFO lines off (seamlm prints its own progress)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


#: Seconds a sweep waits for another process's write to sweep.db to end (sweeps of several labels may share one
#: --out, and so one study file) before it gives up.
SQLITE_TIMEOUT_S = 60.0


def sweep_storage(out_dir: str | Path) -> str:
    """The Optuna storage of the sweeps in ``out_dir`` (``sweep.db``, SQLite, waiting up to
    :data:`SQLITE_TIMEOUT_S` for a lock another process holds)."""
    return f"{_sweep_db_url(out_dir)}?timeout={SQLITE_TIMEOUT_S:g}"


def _sweep_db_url(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'sweep.db'}"


@contextmanager
def readable_sweep_db(out_dir: str | Path, advice: str) -> Iterator[None]:
    """Turn SQLite's refusal of ``out_dir/sweep.db`` (not a database, cut short, a folder at that path), and
    Optuna's of a study file from another Optuna version, into a DataError ending in ``advice``; a file another
    process kept locked is said to be busy, not broken."""
    from optuna import __version__ as optuna_version
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import DatabaseError

    try:
        yield
    except (DatabaseError, StorageInternalError) as exc:  # (OperationalError; Optuna wraps one failing a commit)
        cause = exc if isinstance(exc, DatabaseError) else exc.__cause__
        if not isinstance(cause, DatabaseError):
            raise
        if getattr(cause.orig, "sqlite_errorname", "") in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            raise DataError(f"{out_dir}/sweep.db stayed locked by another process for {SQLITE_TIMEOUT_S:g} s (another "
                            "sweep or rescore on this folder, or a program holding the file open): the file is not "
                            "damaged; rerun once that process is done") from None
        raise DataError(f"{out_dir}/sweep.db is not a readable Optuna study ({cause.orig or cause}): {advice}") from None
    except RuntimeError as exc:  # RDBStorage's schema-version check; any other RuntimeError is not ours
        if "storage upgrade" in str(exc):  # an older Optuna's file
            raise DataError(f"{out_dir}/sweep.db was written by an older Optuna ({exc}). Upgrade it in place with "
                            f"`optuna storage upgrade --storage '{_sweep_db_url(out_dir)}'` (keep a copy first), or "
                            f"{advice}") from None
        if "pip install -U optuna" in str(exc):  # a newer one's
            raise DataError(f"{out_dir}/sweep.db was written by a newer Optuna than this one "
                            f"({optuna_version}): install that Optuna (pip install -U optuna), or {advice}") from None
        raise


def open_study(cfg: SweepConfig, label: str, out_dir: str | Path, context: dict[str, Any] | None = None,
               same_models: Collection[str] = ()) -> Any:
    """The study in ``out_dir/sweep.db`` (created or loaded); trials left RUNNING by a killed process are failed
    and their parameters enqueued again. One process per study at a time.

    ``context`` is what else made its trials' numbers (model, training base, evaluation, judge, data): a study is
    resumed only with the same sweep config (``trials`` may grow) and the same context, so its trials and its best
    trial never mix settings. A study from before contexts were stored adopts the current one."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with readable_sweep_db(out_dir, "restore it or use another --out"):  # (its writes below may meet a lock too)
        return _open_study(cfg, label, out_dir, context, same_models)


def _open_study(cfg: SweepConfig, label: str, out_dir: str | Path, context: dict[str, Any] | None,
                same_models: Collection[str]) -> Any:
    optuna = quiet_optuna()
    name = cfg.study_name or label
    study = optuna.create_study(study_name=name, storage=sweep_storage(out_dir), direction="maximize",
                                load_if_exists=True)
    saved = study.user_attrs.get("sweep_config")
    mine = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "trials"}, sort_keys=True)  # more trials: fine
    if saved is not None and saved != mine:
        raise ConfigError(f"study '{name}' in {out_dir}/sweep.db was made with another sweep config "
                          f"({_changes(json.loads(saved), json.loads(mine))}); use another --out or --study_name, or "
                          "the same settings to resume (only trials may grow)")
    study.set_user_attr("sweep_config", mine)
    if context is not None:
        context = json.loads(json.dumps(context, default=str))  # as storage returns it (tuples become lists)
        before = dict(study.user_attrs.get("sweep_context", context))
        if before.get("model") in same_models:  # the model as an older seamlm named it (its path)
            before["model"] = context.get("model")
        changed = sorted(k for k in {*before, *context} if before.get(k) != context.get(k))
        if changed:
            raise ConfigError(f"study '{name}' in {out_dir}/sweep.db was run with other {', '.join(changed)} "
                              f"settings ({_changes(before, context)}); use another --out or --study_name, or the "
                              "same settings to resume")
        study.set_user_attr("sweep_context", context)
    # seeded by the trials so far: a resumed study seeded as before would replay its random start-up parameters
    study.sampler = optuna.samplers.TPESampler(seed=(cfg.seed + len(study.trials)) % 2**32,
                                                     n_startup_trials=cfg.startup_trials)
    from optuna.trial import TrialState

    retried = set(study.user_attrs.get("retried_trials", []))
    # parameters tried again once already: a retry that stops too (an error that recurs) is not queued again
    again = {json.dumps(t.params, sort_keys=True) for t in study.trials if t.number in retried}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.number in retried or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")):
            continue
        if t.state == TrialState.RUNNING:  # killed outright: optuna could not record it
            study.tell(t.number, state=TrialState.FAIL)
        retried.add(t.number)
        key = json.dumps(t.params, sort_keys=True)
        if key in again:
            log.warning("sweep: trial %d stopped again on parameters already retried once; not retried again",
                        t.number)
            continue
        log.warning("sweep: trial %d was running when the last sweep stopped; trying its parameters again", t.number)
        if t.params:
            study.enqueue_trial(t.params)
        again.add(key)
    study.set_user_attr("retried_trials", sorted(retried))
    return study


def _changes(then: dict[str, Any], now: dict[str, Any]) -> str:
    """``key: old → new`` for each key whose value differs, nested settings (``eval``, ``train``) by their own keys."""
    then, now = flatten(then), flatten(now)
    return ", ".join(f"{k}: {then.get(k, '(absent)')!r} → {now.get(k, '(absent)')!r}"
                     for k in sorted({*then, *now}) if then.get(k, "(absent)") != now.get(k, "(absent)"))


def finished_trials(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def check_sweep_template(cfg: SweepConfig, base: FinetuneConfig, eval_cfg: EvalConfig) -> None:
    """:func:`seamlm.attack.check_eval_template` for every recipe of the sweep; the template recipe's trials choose
    their own template, so no single ``eval.prompt_template`` can match them."""
    if eval_cfg.prompt_template == "chat":
        return
    if "template" in cfg.recipes:
        raise ConfigError("eval.prompt_template is set, but the template recipe's trials each choose a template to "
                          "attack and measure in: drop --eval.prompt_template, or the template recipe")
    for name in cfg.recipes:
        check_eval_template(base, eval_cfg, make_recipe(name))


def sweep_study(model_name: str, label: str, bundle: BundleData, cfg: SweepConfig, base: FinetuneConfig,
                eval_cfg: EvalConfig, judge: Judge, out_dir: str | Path) -> Any:
    """The sweep's study, opened with every check a resumed study must pass (template, sweep config, context):
    call it before spending minutes on anything else, so a mismatch fails first."""
    check_sweep_template(cfg, base, eval_cfg)
    if not eval_cfg.zs_tasks:
        raise ConfigError("eval.zs_tasks is empty, but the sweep selects trials by their ZS drop (ε-bounded): give "
                          "it zero-shot tasks")
    if not eval_cfg.coherence_examples:
        raise ConfigError("eval.coherence_examples is 0, but the sweep selects trials within a coherence bound (benign "
                          "perplexity): give it held-out benign answers (>= 1)")
    check_trained_format(model_name)
    context = {"model": model_identity(model_name), "train": base.trajectory_dict(), "loop": LOOP_VERSION,
               "eval": eval_cfg.settings_dict(), "judge": judge.name, "data": manifest_digest(bundle),
               # the template recipe's trials may choose the plain template
               **prompt_format_parts(model_name, base.prompt_template, "chat",
                                     *(["plain"] if "template" in cfg.recipes else []))}
    return open_study(cfg, label, out_dir, context, legacy_identities(model_name, context["model"]))


@contextmanager
def study_lock(cfg: SweepConfig, label: str, out_dir: str | Path) -> Iterator[None]:
    """One process per study (held from before :func:`open_study` to the sweep's end): a second would take the
    first's running trials for those of a killed sweep, fail them and run them again."""
    name = cfg.study_name or label
    with holding(Path(out_dir) / f".sweep.{path_part(name)}.lock", f"sweep {name}", lambda holder: f"study '{name}' "
                 f"in {out_dir}/sweep.db is being run by another process ({holder}): wait for it to end, or give this "
                 "sweep another --study_name"):
        yield


def run_sweep(model_name: str, label: str, defense: str, bundle: BundleData, cfg: SweepConfig,
              base: FinetuneConfig, eval_cfg: EvalConfig, judge: Judge, out_dir: str | Path,
              store: ResultStore, study: Any | None = None) -> Any:
    """Run trials until the study has ``cfg.trials`` finished ones; each trial is an attack cell in ``store``
    (cell ``sweep-<recipe>-<digest>``, see :func:`_cell_key`). Writes ``sweep_trials.<study name>.csv``. Returns the study.
    ``study``: the one :func:`sweep_study` opened for these arguments under :func:`study_lock`, still held (opened
    and locked here when not given)."""
    with study_lock(cfg, label, out_dir) if study is None else nullcontext():
        study = study or sweep_study(model_name, label, bundle, cfg, base, eval_cfg, judge, out_dir)
        csv_path = Path(out_dir) / f"sweep_trials.{path_part(study.study_name)}.csv"  # (default name: the label)
        missing = cfg.trials - finished_trials(study)
        if missing <= 0:
            log.info("sweep %s: %d trials already finished", study.study_name, cfg.trials)
            write_trials_csv(study, csv_path)
            return study

        def objective(trial: Any) -> float:
            name = (trial.suggest_categorical("recipe", list(cfg.recipes)) if len(cfg.recipes) > 1 else cfg.recipes[0])
            recipe = make_recipe(name)
            recipe = make_recipe(name, recipe.suggest(trial))
            over = suggest_training(trial, cfg) if recipe.trains else {}
            run_cfg = base.replace(**over, seed=cfg.seed)
            cell = f"sweep-{name}-{fingerprint(_cell_key(trial.params, cfg, label))[:8]}"
            meta = {"sweep": study.study_name, "trial": trial.number, "params": trial.params}
            try:
                outcome = attack_cell(model_name, label, defense, bundle, recipe, run_cfg, cfg.num_samples, eval_cfg,
                                      judge, out_dir, store, cell=cell, meta=meta)
            except ConfigError:
                raise  # the trial's parameters do not fit: it fails alone (catch= below) and is not retried
            except BaseException:
                # Ctrl-C, out of memory, a data error: optuna records FAIL and the sweep stops; the next run retries it
                trial.set_user_attr("interrupted", True)
                raise
            v = outcome.values or {}
            for k in ("zs_mean", "coherence_ppl", "refusal_rate"):
                if k in v:
                    trial.set_user_attr(k, v[k])
            trial.set_user_attr("cell", cell)
            hs = v.get("hs", math.nan)
            if not math.isfinite(hs):
                raise ConfigError(f"sweep trial {trial.number}: HS is {hs}")
            return hs

        def save(study_: Any, _trial: Any) -> None:
            write_trials_csv(study_, csv_path)
            if _failures_in_a_row(study_) >= FAILURE_PATIENCE:
                study_.stop()  # within the round too: an always-failing search must not run out its trials

        # a trial whose parameters do not fit the model (first4 on a 2-layer model) or whose HS is NaN fails alone,
        # recorded as FAIL with its reason, and another is drawn; FAILURE_PATIENCE failures in a row stop the sweep (not
        # one failed round: with one trial left, one unlucky draw would stop it)
        while missing > 0:
            study.optimize(objective, n_trials=missing, callbacks=[save], show_progress_bar=True, gc_after_trial=True,
                           catch=(ConfigError,))
            failed = _failures_in_a_row(study)
            if failed >= FAILURE_PATIENCE:
                raise ConfigError(f"sweep {study.study_name}: the last {failed} trials failed (reasons above); check the "
                                  f"recipes' knobs against the model")
            missing = cfg.trials - finished_trials(study)
        return study


#: failed trials in a row after which a sweep stops (its trials' parameters keep not fitting the model)
FAILURE_PATIENCE = 5


def _failures_in_a_row(study: Any) -> int:
    """How many of the study's last trials failed on their parameters: an interrupted one (Ctrl-C, or killed outright
    and so in ``retried_trials``) and one queued but not run yet are skipped, neither extending nor breaking it."""
    import optuna

    n, retried = 0, set(study.user_attrs.get("retried_trials", []))
    for t in reversed(study.get_trials(deepcopy=False)):
        if t.state == optuna.trial.TrialState.WAITING or (
                t.state == optuna.trial.TrialState.FAIL and (t.user_attrs.get("interrupted") or t.number in retried)):
            continue
        if t.state != optuna.trial.TrialState.FAIL:
            break
        n += 1
    return n


def _cell_key(params: dict[str, Any], cfg: SweepConfig, label: str) -> dict[str, Any]:
    """What a trial's cell name digests. Another study in the same ``--out`` (where a changed sweep config or
    context is sent) may train with other settings or draw other examples (the seed), so a named study and a
    non-zero seed are part of the key; the default study with seed 0 keeps the names earlier sweeps had."""
    key = dict(params)
    if cfg.seed:
        key["seed"] = cfg.seed
    if cfg.study_name and cfg.study_name != label:
        key["study"] = cfg.study_name
    return key


def write_trials_csv(study: Any, path: Path) -> Path:
    """All trials: number, state, HS (value), ZS, perplexity, refusal rate, cell and parameters."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "hs", "zs_mean", "coherence_ppl", "refusal_rate", "cell", *keys])
        for t in trials:
            a = t.user_attrs
            w.writerow([t.number, t.state.name, t.value, a.get("zs_mean"), a.get("coherence_ppl"),
                        a.get("refusal_rate"), a.get("cell"), *[t.params.get(k) for k in keys]])
    return path
