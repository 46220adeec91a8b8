"""The harmful fine-tuning attack as a grid (learning rate × seed), each cell evaluated and appended to the
results file; a stopped grid resumes without redoing finished cells."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from seamlm.data.bundles import BundleData
from seamlm.data.format import Formatter, TokenizedExample
from seamlm.data.splits import prompt_hash
from seamlm.distributed import DistContext, load_model_for_rank
from seamlm.errors import ConfigError, DataError, NonFiniteLossError
from seamlm.evaluate.judges import Judge
from seamlm.evaluate.metrics import EvalConfig, answer_ce_of_rows
from seamlm.evaluate.run import attack_probe, evaluate_model
from seamlm.finetune import LOOP_VERSION, FinetuneConfig, probe_log_path, probing
from seamlm.locks import HolderLock
from seamlm.models import (
    check_trained_format,
    has_chat_template,
    legacy_identities,
    load_model,
    model_identity,
    prompt_format_parts,
    trained_prompt_hashes,
)
from seamlm.recipes import AttackData, AttackRecipe, make_recipe
from seamlm.results import ResultRow, ResultStore
from seamlm.runinfo import fingerprint, path_part

log = logging.getLogger(__name__)

PAPER_LRS = (2e-5, 5e-5, 8e-5, 1e-4, 2e-4)


@dataclass
class AttackConfig(FinetuneConfig):
    """Harmful fine-tuning grid: learning_rates × num_samples × num_epochs × seeds, one cell each; every other field
    is the fine-tuning recipe of all cells (batch 4, AdamW, cosine, 10 % warm-up, weight decay 0.01 by default)."""

    learning_rates: tuple[float, ...] = PAPER_LRS
    """Attack learning rates (the paper's grid)."""
    num_samples: tuple[int, ...] = (1000,)
    """Harmful examples per attack (all available when fewer; the log says how many were used)."""
    num_epochs: tuple[int, ...] = (1,)
    """Epochs per attack."""
    seeds: tuple[int, ...] = (0,)
    """Attack seeds (data order, LoRA init)."""

    #: fine-tuning fields the grid sets per cell, and the grid field that holds them
    GRID_OWNED: ClassVar[dict[str, str]] = {"lr": "learning_rates", "epochs": "num_epochs", "seed": "seeds"}

    @classmethod
    def refuse_grid_owned(cls, keys: Collection[str], source: str = "command line") -> None:
        """Keys given on the command line or in a config file: ``lr`` there, even at its default value (which
        :meth:`validate` cannot tell from unset), would be ignored by the grid."""
        given = [k for k in keys if k in cls.GRID_OWNED]
        if not given:
            return
        if source == "command line":
            raise ConfigError(f"{', '.join('--' + k for k in given)}: one cell's value, which the attack grid sets; "
                              f"use {', '.join('--' + cls.GRID_OWNED[k] for k in given)} (comma-separated)")
        raise ConfigError(f"{source}: {', '.join(given)} is one cell's value, which the attack grid sets; use "
                          f"{', '.join(cls.GRID_OWNED[k] for k in given)} (a list) instead")

    def to_yaml_text(self) -> str:
        """Without the grid-owned one-cell fields (``lr``, ``epochs``, ``seed``), which ``--config`` refuses: the file
        written next to a grid reruns it."""
        return yaml.safe_dump({k: v for k, v in self.to_dict().items() if k not in self.GRID_OWNED}, sort_keys=False)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml_text(), encoding="utf-8")

    @classmethod
    def same_record(cls, old: str, new: str) -> bool:
        """Whether two written configs are one grid (an older seamlm also wrote the one-cell fields)."""
        def fields(text: str) -> dict[str, Any]:
            return {k: v for k, v in (yaml.safe_load(text) or {}).items() if k not in cls.GRID_OWNED}

        return fields(old) == fields(new)

    def validate(self) -> None:
        super().validate()
        base = FinetuneConfig()
        moved = [k for k in self.GRID_OWNED if getattr(self, k) != getattr(base, k)]
        if moved:
            raise ConfigError(f"AttackConfig: set {moved} through the grid fields learning_rates / num_epochs / seeds")
        bad = [f"{k} {v}" for k, v in (("num_samples", min(self.num_samples)), ("num_epochs", min(self.num_epochs)))
               if v < 1] + [f"learning_rates {v:g}" for v in self.learning_rates if v <= 0]
        if bad:
            raise ConfigError(f"AttackConfig: {', '.join(bad)}: num_samples and num_epochs must be >= 1, learning "
                              "rates > 0")

    def run_config(self, **grid: Any) -> FinetuneConfig:
        """The fine-tuning config of one cell: this config's fine-tuning fields with ``grid``'s (lr, seed, epochs)."""
        names = FinetuneConfig.field_names()
        return FinetuneConfig.from_dict({k: v for k, v in self.to_dict().items() if k in names} | grid)

    def cells(self) -> list[dict[str, float | int]]:
        return [{"lr": lr, "num_samples": n, "epochs": ep, "seed": s}
                for s in self.seeds for n in self.num_samples for ep in self.num_epochs for lr in self.learning_rates]



def manifest_digest(bundle: BundleData) -> str:
    return fingerprint(bundle.manifest)


def settings_digest(**parts: Any) -> str:
    return fingerprint(parts)


def legacy_digests(parts: dict[str, Any], model_name: str | Path) -> set[str]:
    """Digests of ``parts`` under the names older results gave the model (:func:`legacy_identities`)."""
    return {settings_digest(**{**parts, "model": name}) for name in legacy_identities(model_name, parts["model"])}


def finished_rows(store: ResultStore, model_name: str, label: str, cell: str, settings: str,
                  parts: dict[str, Any], also: set[str] = frozenset()) -> list[ResultRow]:
    """The rows of ``cell`` of ``label`` made with ``settings`` (the digest of ``parts``; also as an older seamlm named
    the model, or ``also``: other digests older seamlm gave these settings); none: the cell is to run, and only if
    the label's other cells come from the same model, judge and data (a changed setting of this very cell is named
    by :meth:`ResultStore.cell_rows` first)."""
    found = store.cell_rows(label, cell, settings, parts, legacy_digests(parts, model_name) | set(also))
    if not found:
        store.check_label(label, parts, legacy_identities(model_name, parts["model"]),
                          every_cell_formatted=not has_chat_template(model_name))
        check_trained_format(model_name)
    return found


#: Bundle streams an attack or evaluation uses, which must hold no prompt the model was trained on.
HELD_OUT_STREAMS = ("attack", "eval_harmful", "benign_heldout", "attack_benign")


def check_held_out(model_name: str, bundle: BundleData) -> None:
    """Refuse data whose attack or evaluation prompts the model (a seamlm-trained one, which lists them) saw in
    its defence or alignment: a SEAM model attacked with its own defence data looks more robust than it is."""
    seen = trained_prompt_hashes(model_name)
    if not seen:
        return
    hits = {k: n for k in HELD_OUT_STREAMS
            if (n := sum(prompt_hash(e.prompt) in seen for e in bundle.streams.get(k, [])))}
    if hits:
        where = ", ".join(f"{n} of {len(bundle.streams[k])} {k}" for k, n in hits.items())
        raise DataError(f"{model_name} was trained on prompts of this data's held-out sets ({where}): attack and "
                        "evaluate it with the bundle and --data-seed its defence used (their splits are disjoint), "
                        "or build the data so that they are")


def _rows(values: dict[str, float], base: dict[str, Any], judge: Judge) -> list[ResultRow]:
    return [ResultRow(metric=k, value=float(v), judge=judge.name, **base) for k, v in values.items()]


def peak(values: list[float]) -> float:
    """The largest value; NaN when any is NaN (Python's max() skips a NaN or returns it, by where it stands)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def samples_file(out_dir: str | Path, label: str, cell: str) -> Path:
    """Where a cell's evaluation keeps its generated answers (``seamlm rescore`` reads them back)."""
    if cell == "pre":
        return Path(out_dir) / "samples" / path_part(label) / "pre.jsonl"
    return Path(out_dir) / "attacks" / path_part(label) / cell / "samples.jsonl"


def cell_lock(out_dir: str | Path, label: str, cell: str) -> HolderLock:
    """The lock one process holds while it measures ``cell`` of ``label`` (beside the cell's saved answers), so that
    several processes on one results file (e.g. one ``seamlm attack`` per GPU) never run a cell twice."""
    answers = samples_file(out_dir, label, cell)
    return HolderLock(answers.with_name(f".{answers.name}.lock"), f"{'eval' if cell == 'pre' else 'attack'} "
                      f"{label} / {cell}")


#: seconds between two tries of a cell lock another process holds
LOCK_POLL_S = 2.0


def _acquire(lock: HolderLock, wait: bool, ctx: DistContext) -> bool:
    """Rank 0 takes ``lock`` and every rank learns whether it did. Held by another process: False, or (``wait``)
    tried again until free — the other ranks meet rank 0 in one short collective per try, never in one as long as
    the wait (which would outlast the collective timeout)."""
    told = False
    while True:
        if ctx.broadcast_object(lock.acquire() if ctx.is_main else None):
            return True
        if not wait:
            return False
        if ctx.is_main and not told:
            log.info("%s: being measured by another process (%s): waiting for it", lock.command, lock.holder())
            told = True
        time.sleep(LOCK_POLL_S)


def _done(ctx: DistContext, rows: list[ResultRow]) -> bool:
    """Rank 0's answer to "is the cell in the store?" on every rank: another process appending to the results file
    may finish the cell between two ranks' reads, and ranks that disagreed would wait in different collectives."""
    return bool(ctx.broadcast_object(bool(rows) if ctx.is_main else None))


@dataclass
class _Claim:
    done: bool
    """The store holds the cell (checked before taking its lock and again after, on rank 0's word)."""
    rows: list[ResultRow]
    """Its rows when done (on rank 0)."""
    busy: bool = False
    """Another process holds the cell's lock and it was not waited for."""


@contextmanager
def _claim_cell(ctx: DistContext, model_name: str, bundle: BundleData, lock: HolderLock, wait: bool,
                finished: Callable[[], list[ResultRow]]) -> Iterator[_Claim]:
    """Claim one cell for this process: done (in the store), busy, or held — ``lock`` then stays taken until the
    block ends, so a second process on the results file never measures it too."""
    rows = finished()
    if _done(ctx, rows):
        yield _Claim(True, rows)
        return
    check_held_out(model_name, bundle)
    if not _acquire(lock, wait, ctx):
        yield _Claim(False, [], busy=True)
        return
    try:
        rows = finished()  # the process waited for may have finished the cell
        done = _done(ctx, rows)
        yield _Claim(done, rows if done else [])
    finally:
        lock.release()


def evaluate_pre_attack(model_name: str, label: str, defense: str, bundle: BundleData, eval_cfg: EvalConfig,
                        judge: Judge, out_dir: str | Path, store: ResultStore, ctx: DistContext | None = None) -> bool:
    """Evaluate the unattacked model (cell ``pre``) unless the store has it. Returns True when it ran.
    Under several processes rank 0 evaluates and the others wait."""
    ctx = ctx or DistContext()
    eval_cfg = eval_cfg.replace(trajectory_every=0)  # no attack, no trajectory: not part of this cell's settings
    digest = manifest_digest(bundle)
    # FS, perplexity and the coupling always format through "chat", HS through eval.prompt_template
    parts = dict(model=model_identity(model_name), eval=eval_cfg.settings_dict(), judge=judge.name, data=digest,
                 **prompt_format_parts(model_name, eval_cfg.prompt_template, "chat"))
    settings = settings_digest(**parts)
    with _claim_cell(ctx, model_name, bundle, cell_lock(out_dir, label, "pre"), True,
                     lambda: finished_rows(store, model_name, label, "pre", settings, parts)) as claim:
        if claim.done:
            log.info("%s / pre: already in %s, skipped", label, store.path)
            return False
        if ctx.is_main:
            model, tok = load_model(model_name, dtype="float32")
            values = evaluate_model(model, tok, bundle, eval_cfg, judge, samples_file(out_dir, label, "pre"))
            store.append(_rows(values, dict(model=label, defense=defense, cell="pre", seed=eval_cfg.seed,
                                            data_manifest=digest, settings=settings), judge), settings_parts=parts)
    ctx.barrier()  # (the other ranks wait here while rank 0 evaluates)
    return True


#: Fine-tuning fields named in every cell key (the grid's own fields and these) — a change to any other field
#: adds a digest of the changed fields to the key, so differently hardened attacks never share a cell.
_KEYED = {"lr", "seed", "epochs", "lora", "lora_r", "optimizer", "batch_size"}


def cell_key(run_cfg: FinetuneConfig, recipe: AttackRecipe, n: int) -> str:
    """``<recipe>[-<knobs digest>]-<full|lora-rR>-<optimizer>-lr..-n..-ep..-b..-s..[-h<digest of other changes>]``."""
    defaults = FinetuneConfig().to_dict()
    if not recipe.trains:
        key = f"{recipe.name}-{fingerprint(recipe.knobs.to_dict())[:6]}-n{n}-s{run_cfg.seed}"
        # the one fine-tuning field a weight edit reads: the template its prompts are formatted and measured in
        changed = {k: getattr(run_cfg, k) for k in ("prompt_template",) if getattr(run_cfg, k) != defaults[k]}
        return f"{key}-h{fingerprint(changed)[:6]}" if changed else key
    mode = f"lora-r{run_cfg.lora_r}" if run_cfg.lora else "full"
    key = f"{mode}-{run_cfg.optimizer}-lr{run_cfg.lr:g}-n{n}-ep{run_cfg.epochs}-b{run_cfg.batch_size}-s{run_cfg.seed}"
    key = f"sft-{key}" if recipe.name == "sft" else f"{recipe.name}-{fingerprint(recipe.knobs.to_dict())[:6]}-{key}"
    changed = {k: v for k, v in run_cfg.trajectory_dict().items() if k not in _KEYED and v != defaults[k]}
    return f"{key}-h{fingerprint(changed)[:6]}" if changed else key


@dataclass
class CellOutcome:
    cell: str
    values: dict[str, float] | None
    """Metric -> value (None on ranks other than 0)."""
    ran: bool
    """False when the store already held the cell."""
    busy: bool = False
    """Another process was measuring the cell (and it was not waited for)."""


def attack_data(bundle: BundleData, recipe: AttackRecipe, n: int, seed: int) -> AttackData:
    """The attacker's data for one cell: ``n`` harmful examples (seeded subset of the attack stream) and the
    bundle's attacker-benign stream."""
    examples = list(bundle.streams["attack"])
    random.Random(seed).shuffle(examples)
    if len(examples) < n:
        log.warning("attack: %d harmful examples available, %d requested; using %d", len(examples), n, len(examples))
    data = AttackData(examples[:n], list(bundle.streams.get("attack_benign", [])))
    recipe.check_data(data)
    return data


def attack_cell(model_name: str, label: str, defense: str, bundle: BundleData, recipe: AttackRecipe,
                run_cfg: FinetuneConfig, n_samples: int, eval_cfg: EvalConfig, judge: Judge, out_dir: str | Path,
                store: ResultStore, ctx: DistContext | None = None, cell: str | None = None,
                meta: dict[str, Any] | None = None, wait: bool = True) -> CellOutcome:
    """Attack ``model_name`` with ``recipe`` and ``run_cfg``, evaluate, append the rows; return the metric values
    (read back from the store when the cell is already there). A cell another process is measuring is waited for
    (``wait``; else left to it: ``busy``, no values).

    The attack's per-step log goes to ``out_dir/attacks/<label>/<cell>/loss.jsonl``; a diverged attack (NaN loss) is
    evaluated as it stands and marked ``status: diverged``. HS is measured through the prompt template the attack
    trained with. ``meta`` is added to the row's attack settings (e.g. the sweep trial).
    """
    ctx = ctx or DistContext()
    out = Path(out_dir)
    data = attack_data(bundle, recipe, n_samples, run_cfg.seed)
    train_cfg = recipe.training_config(run_cfg)
    cell = cell or cell_key(run_cfg, recipe, len(data.harmful))
    cell_eval = eval_cfg.replace(prompt_template=train_cfg.prompt_template)
    recorded_eval = cell_eval  # what an older seamlm put in the digest
    if not recipe.trains and cell_eval.trajectory_every:
        log.info("%s: a weight edit takes no training steps: no trajectory probes (trajectory_every unused)",
                 recipe.name)
        cell_eval = cell_eval.replace(trajectory_every=0)
    digest = manifest_digest(bundle)
    parts = dict(model=model_identity(model_name), eval=cell_eval.settings_dict(), judge=judge.name, data=digest,
                 recipe=recipe.describe(), train=train_cfg.trajectory_dict() if recipe.trains else None,
                 # a weight edit trains nothing, but the seed still picks its harmful prompts (attack_data)
                 **({"loop": LOOP_VERSION} if recipe.trains else {"seed": run_cfg.seed}),
                 samples=len(data.harmful), **prompt_format_parts(model_name, train_cfg.prompt_template, "chat"))
    settings = settings_digest(**parts)
    older = {settings_digest(**{**parts, "eval": recorded_eval.settings_dict()})} if recorded_eval is not cell_eval else set()
    lock = cell_lock(out, label, cell)
    with _claim_cell(ctx, model_name, bundle, lock, wait,
                     lambda: finished_rows(store, model_name, label, cell, settings, parts, older)) as claim:
        if claim.done:
            log.info("%s / %s: already in %s, skipped", label, cell, store.path)
            return CellOutcome(cell, {r.metric: r.value for r in claim.rows} if ctx.is_main else None, False)
        if claim.busy:
            if ctx.is_main:
                log.info("%s: being measured by another process (%s): left to it", lock.command, lock.holder())
            return CellOutcome(cell, None, False, busy=True)
        cell_dir = out / "attacks" / path_part(label) / cell
        if ctx.is_main:
            cell_dir.mkdir(parents=True, exist_ok=True)
        # fp32 master weights: bf16 updates at 2e-5 round away
        # only a training recipe shards (and so fills the other ranks' meta skeletons from rank 0)
        model, tok = load_model_for_rank(model_name, ctx, "float32",
                                         shard_parameters=train_cfg.shard_parameters and recipe.trains)
        status, logs, probes, diverged_in = "ok", [], [], None
        # the per-step loss compares different batches; this is one fixed set before and after (one process only:
        # a sharded rank holds no whole model to run it on)
        ce_rows = _attack_ce_rows(tok, data, train_cfg) if recipe.trains and not ctx.distributed else []
        ce_before = answer_ce_of_rows(model, ce_rows, tok.pad_token_id) if ce_rows else None  # NaN once diverged
        try:
            with probing(attack_probe(tok, bundle, cell_eval) if recipe.trains else None):
                result = recipe.attack(model, tok, data, run_cfg, cell_dir / "loss.jsonl",
                                       f"attack {label} {recipe.name} lr={run_cfg.lr:g}" if recipe.trains
                                       else f"attack {label} {recipe.name}", ctx)
            model, logs, probes = result.model, result.logs, result.probes
        except NonFiniteLossError as exc:
            log.warning("%s: %s", cell, exc)
            status, model, logs = "diverged", exc.model, getattr(exc, "logs", [])
            probes, diverged_in = getattr(exc, "probes", []), getattr(exc, "phase", None)
        if not ctx.is_main:
            ctx.barrier()
            return CellOutcome(cell, None, True)
        values = evaluate_model(model, tok, bundle, cell_eval, judge, samples_file(out, label, cell))
        harmful = [r.get("harmful_ce", r["loss"]) for r in logs if "loss" in r] if recipe.logs_harmful_loss else []
        if harmful:
            # per-batch losses are noisy (and the last batch may be short): report means of the first/last 10 %
            w = max(1, len(harmful) // 10)
            values.update(attack_first_loss=sum(harmful[:w]) / w, attack_final_loss=sum(harmful[-w:]) / w)
        if ce_before is not None:
            values.update(attack_ce_before=ce_before, attack_ce_after=answer_ce_of_rows(model, ce_rows, tok.pad_token_id))
        if probes:
            values["attack_peak_ppl"] = peak([p["benign_ppl"] for p in probes])
            if probes[0].get("updates") == 0:  # the same answers before the first step: the peak's own baseline
                values["attack_start_ppl"] = probes[0]["benign_ppl"]
        attack: dict[str, Any] = {**recipe.describe(), "seed": run_cfg.seed, "samples": len(data.harmful), "status": status}
        if len(data.harmful) < n_samples:  # the whole attack stream: runs of other data seeds line up by the count asked
            attack["samples_requested"] = n_samples
        if diverged_in:
            attack["diverged_in"] = diverged_in
        if recipe.trains:
            attack.update(lr=run_cfg.lr, epochs=run_cfg.epochs, batch_size=train_cfg.batch_size,
                          optimizer=train_cfg.optimizer, lora=train_cfg.lora,
                          lora_r=train_cfg.lora_r if train_cfg.lora else None, max_grad_norm=train_cfg.max_grad_norm,
                          lr_scheduler=train_cfg.lr_scheduler, warmup_ratio=train_cfg.warmup_ratio,
                          prompt_template=train_cfg.prompt_template,
                          loss_log=str((cell_dir / "loss.jsonl").relative_to(out)))
            if probes:
                attack["probe_log"] = str(probe_log_path(cell_dir / "loss.jsonl").relative_to(out))
        attack.update(meta or {})
        store.append(_rows(values, dict(model=label, defense=defense, cell=cell, seed=run_cfg.seed, attack=attack,
                                        data_manifest=digest, settings=settings), judge), settings_parts=parts)
        ctx.barrier()
        return CellOutcome(cell, values, True)


#: How many attack examples (the first of the cell's seeded attack subset, all of which it trains on) have their
#: answer CE measured before and after each attack.
ATTACK_CE_EXAMPLES = 16


def _attack_ce_rows(tok: Any, data: AttackData, train_cfg: FinetuneConfig) -> list[TokenizedExample]:
    fmt = Formatter(tok, train_cfg.max_length, template=train_cfg.prompt_template,
                    truncate_first=train_cfg.truncate_first)
    return [fmt(e) for e in data.harmful[:ATTACK_CE_EXAMPLES]]  # (cut as the attack cuts them, which warns)


def check_eval_template(cfg: FinetuneConfig | AttackConfig, eval_cfg: EvalConfig,
                        recipe: AttackRecipe | None = None) -> None:
    """The pre-attack cell is measured through ``eval.prompt_template`` (default: the chat template, the model as
    deployed); an attack cell through the template its attack trained with (so a template-shift attack is measured
    in its own template; its no-training control separates what the template alone does). An
    ``eval.prompt_template`` set to another template than the attack's would reach the pre-attack cell only: pre
    and post of one table would silently use different templates, so it is refused."""
    if eval_cfg.prompt_template == "chat":
        return
    run_cfg = cfg.run_config() if isinstance(cfg, AttackConfig) else cfg
    recipe = recipe or make_recipe("sft")
    trained = recipe.training_config(run_cfg).prompt_template
    if eval_cfg.prompt_template != trained:
        how = (f"--recipe.template {eval_cfg.prompt_template}" if recipe.name == "template"
               else f"--prompt_template {eval_cfg.prompt_template}")
        raise ConfigError(f"eval.prompt_template={eval_cfg.prompt_template} but the attack trains (and its cells are "
                          f"measured) with the {trained} template: set {how} to attack and measure in it, or drop "
                          "--eval.prompt_template")


def run_attack_grid(model_name: str, label: str, defense: str, bundle: BundleData, cfg: AttackConfig,
                    eval_cfg: EvalConfig, judge: Judge, out_dir: str | Path, store: ResultStore,
                    ctx: DistContext | None = None, recipe: AttackRecipe | None = None) -> list[str]:
    """Attack ``model_name`` once per grid cell not yet in ``store`` (see :func:`attack_cell`); every cell starts
    from the same weights. ``recipe`` (default: plain SFT) is the attack; a recipe that does not train (a weight
    edit) runs once per seed and sample count. Returns the cells that ran. Under several processes (``ctx``) every
    rank trains its share of each batch (data parallel) and rank 0 evaluates and writes the cell.
    """
    recipe = recipe or make_recipe("sft")
    check_eval_template(cfg, eval_cfg, recipe)
    cells = cfg.cells()
    if not recipe.trains:
        default = AttackConfig()
        # the prompt template is the one fine-tuning field a weight edit uses (it reads the prompts through it)
        unused = [f for f in AttackConfig.field_names() if f not in ("prompt_template", "num_samples", "seeds")
                  and getattr(cfg, f) != getattr(default, f)]
        if unused:
            log.warning("recipe %s does not train: %s set but not used (one cell per seed and sample count)",
                        recipe.name, ", ".join(unused))
        cells = list({(c["seed"], c["num_samples"]): c for c in cells}.values())
    ran = []
    # cells another process is measuring are passed over first, then waited for: processes sharing a grid share
    # its cells out
    for wait in (False, True):
        busy = []
        for grid in cells:
            run_cfg = cfg.run_config(lr=grid["lr"], seed=grid["seed"], epochs=grid["epochs"])
            outcome = attack_cell(model_name, label, defense, bundle, recipe, run_cfg, int(grid["num_samples"]),
                                  eval_cfg, judge, out_dir, store, ctx, wait=wait)
            if outcome.ran:
                ran.append(outcome.cell)
            if outcome.busy:
                busy.append(grid)
        cells = busy
    return ran
