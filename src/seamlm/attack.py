"""The harmful fine-tuning attack as a grid (learning rate × seed), each cell evaluated and appended to the
results file; a stopped grid resumes without redoing finished cells."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seamlm.data.bundles import BundleData
from seamlm.distributed import DistContext
from seamlm.errors import ConfigError, NonFiniteLossError
from seamlm.evaluate.judges import Judge
from seamlm.evaluate.metrics import EvalConfig
from seamlm.evaluate.run import evaluate_model
from seamlm.finetune import FinetuneConfig, finetune
from seamlm.models import load_model
from seamlm.results import ResultRow, ResultStore
from seamlm.runinfo import fingerprint

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

    def validate(self) -> None:
        super().validate()
        grid_owned = {"lr": 2e-5, "epochs": 1, "seed": 0}
        moved = [k for k, default in grid_owned.items() if getattr(self, k) != default]
        if moved:
            raise ConfigError(f"AttackConfig: set {moved} through the grid fields learning_rates / num_epochs / seeds")
        if (min(self.num_samples) < 1 or min(self.num_epochs) < 1 or min(self.learning_rates) <= 0):
            raise ConfigError("AttackConfig: num_samples and num_epochs >= 1, learning rates > 0")

    def cells(self) -> list[dict[str, float | int]]:
        return [{"lr": lr, "num_samples": n, "epochs": ep, "seed": s}
                for s in self.seeds for n in self.num_samples for ep in self.num_epochs for lr in self.learning_rates]

    def cell_key(self, lr: float, seed: int, n: int, epochs: int) -> str:
        mode = f"lora-r{self.lora_r}" if self.lora else "full"
        return f"sft-{mode}-{self.optimizer}-lr{lr:g}-n{n}-ep{epochs}-s{seed}"


def manifest_digest(bundle: BundleData) -> str:
    return fingerprint(bundle.manifest)


def settings_digest(**parts: Any) -> str:
    return fingerprint(parts)


def _rows(values: dict[str, float], base: dict[str, Any], judge: Judge) -> list[ResultRow]:
    return [ResultRow(metric=k, value=float(v), judge=judge.name if k in ("hs", "hs_binary") else None, **base)
            for k, v in values.items()]


def evaluate_pre_attack(model_name: str, label: str, defense: str, bundle: BundleData, eval_cfg: EvalConfig,
                        judge: Judge, out_dir: str | Path, store: ResultStore, ctx: DistContext | None = None) -> bool:
    """Evaluate the unattacked model (cell ``pre``) unless the store has it. Returns True when it ran.
    Under several processes rank 0 evaluates and the others wait."""
    ctx = ctx or DistContext()
    digest = manifest_digest(bundle)
    settings = settings_digest(model=model_name, eval=eval_cfg.to_dict(), judge=judge.name, data=digest)
    if store.done(label, "pre", settings):
        log.info("%s / pre: already in %s, skipped", label, store.path)
        return False
    if not ctx.is_main:
        ctx.barrier()
        return True
    model, tok = load_model(model_name, dtype="float32")
    values = evaluate_model(model, tok, bundle, eval_cfg, judge, Path(out_dir) / "samples" / label / "pre.jsonl")
    store.append(_rows(values, dict(model=label, defense=defense, cell="pre", seed=eval_cfg.seed,
                                    data_manifest=digest, settings=settings), judge))
    ctx.barrier()
    return True


def run_attack_grid(model_name: str, label: str, defense: str, bundle: BundleData, cfg: AttackConfig,
                    eval_cfg: EvalConfig, judge: Judge, out_dir: str | Path, store: ResultStore,
                    ctx: DistContext | None = None) -> list[str]:
    """Attack ``model_name`` once per (seed, lr) cell not yet in ``store``; evaluate and append each cell.

    Every cell starts from the same weights. The attack's per-step loss goes to
    ``out_dir/attacks/<label>/<cell>/loss.jsonl``; a diverged attack (NaN loss) is evaluated as it stands and marked
    ``status: diverged``. Returns the cells that ran. Under several processes (``ctx``) every rank trains its share
    of each batch (data parallel) and rank 0 evaluates and writes the cell.
    """
    ctx = ctx or DistContext()
    out = Path(out_dir)
    data = bundle.streams["attack"]
    digest = manifest_digest(bundle)
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("learning_rates", "num_samples", "num_epochs", "seeds")}
    ran = []
    for grid in cfg.cells():
        lr, seed, epochs = grid["lr"], int(grid["seed"]), int(grid["epochs"])
        examples = list(data)
        random.Random(seed).shuffle(examples)
        examples = examples[: int(grid["num_samples"])]
        if len(examples) < grid["num_samples"]:
            log.warning("attack: %d harmful examples available, %d requested; using %d",
                        len(data), grid["num_samples"], len(examples))
        cell = cfg.cell_key(lr, seed, len(examples), epochs)
        settings = settings_digest(model=model_name, eval=eval_cfg.to_dict(), judge=judge.name, data=digest,
                                   recipe=recipe, cell=grid)
        if store.done(label, cell, settings):
            log.info("%s / %s: already in %s, skipped", label, cell, store.path)
            continue
        cell_dir = out / "attacks" / label / cell
        if ctx.is_main:
            cell_dir.mkdir(parents=True, exist_ok=True)
        # fp32 master weights: bf16 updates at 2e-5 round away
        model, tok = load_model(model_name, dtype="float32", device=str(ctx.device) if ctx.distributed else None)
        run_cfg = FinetuneConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                            if k in FinetuneConfig.field_names()}
                                           | {"lr": lr, "seed": seed, "epochs": epochs})
        status, losses = "ok", []
        try:
            result = finetune(model, tok, examples, run_cfg, cell_dir / "loss.jsonl", desc=f"attack {label} lr={lr:g}",
                              ctx=ctx)
            model, losses = result.model, result.losses
        except NonFiniteLossError as exc:
            log.warning("%s: %s", cell, exc)
            status, model, losses = "diverged", exc.model, exc.losses
        ran.append(cell)
        if not ctx.is_main:
            ctx.barrier()
            continue
        values = evaluate_model(model, tok, bundle, eval_cfg, judge, cell_dir / "samples.jsonl")
        if losses:
            # per-batch losses are noisy (and the last batch may be short): report means of the first/last 10 %
            w = max(1, len(losses) // 10)
            values.update(attack_first_loss=sum(losses[:w]) / w, attack_final_loss=sum(losses[-w:]) / w)
        attack = {"recipe": "sft", "lr": lr, "seed": seed, "samples": len(examples), "epochs": epochs,
                  "batch_size": cfg.batch_size, "optimizer": cfg.optimizer, "lora": cfg.lora,
                  "lora_r": cfg.lora_r if cfg.lora else None, "status": status,
                  "loss_log": str((cell_dir / "loss.jsonl").relative_to(out))}
        store.append(_rows(values, dict(model=label, defense=defense, cell=cell, seed=seed, attack=attack,
                                        data_manifest=digest, settings=settings), judge))
        ctx.barrier()
    return ran
