"""The plain alignment baseline as a registered defence: supervised fine-tuning on harmful prompts with refusals (R)
and benign Q+A (B) — what ``seamlm demo`` calls the *undefended aligned* model (its ``align`` stage is this with
``DemoConfig.align_config()``, through :meth:`RefusalSFT.fit`). It gives every other defence its point of comparison: aligned, but with nothing
that resists harmful fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from seamlm.data.files import Example
from seamlm.defense.base import Defense, StreamData, register_defense
from seamlm.distributed import DistContext
from seamlm.errors import ConfigError
from seamlm.finetune import LOOP_VERSION, FinetuneConfig, finetune
from seamlm.jsonl import write_text_atomic
from seamlm.models import is_saved_model, save_model
from seamlm.runinfo import environment_info


@register_defense
class RefusalSFT(Defense):
    name = "refusal-sft"
    summary = "refusal + benign SFT (the undefended aligned baseline; FinetuneConfig fields, LoRA included)"
    Config = FinetuneConfig
    streams = ("refusal", "benign")

    def run(self, model: Any, tokenizer: Any, data: dict[str, StreamData], out_dir: str | Path, *,
            resume: bool = False, run_info: dict[str, Any] | None = None, ctx: DistContext | None = None) -> Path:
        ctx = ctx or DistContext()
        out = Path(out_dir)
        # rank 0 judges the folder and every rank gets its verdict before rank 0 writes there (a rank checking later
        # would find rank 0's fresh log.jsonl and refuse "an earlier run")
        refused = None
        if ctx.is_main:
            try:
                self.check_out(out, resume)
            except Exception as err:  # noqa: BLE001 (any failure must reach the ranks waiting in the broadcast)
                refused = str(err) if isinstance(err, ConfigError) else f"{out}: {err!r}"
        refused = ctx.broadcast_object(refused)
        if refused:
            raise ConfigError(refused)
        streams = self.examples(data)
        cfg: FinetuneConfig = self.config  # type: ignore[assignment]
        sizes = {k: len(v) for k, v in streams.items()}
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            info = {"defense": self.name, "config": cfg.to_dict(), "seed": cfg.seed, "loop": LOOP_VERSION,
                    "data_sizes": sizes, **environment_info(), **(run_info or {})}
            write_text_atomic(out / "run.json", json.dumps(info, indent=2, default=str))  # (read back on resume)
            cfg.to_yaml(out / "config.yaml")
        tuned, examples = self.fit(model, tokenizer, streams, out / "log.jsonl", desc=self.name, ctx=ctx)
        if ctx.is_main:
            save_model(tuned, tokenizer, out / "model",
                       {"stage": "defend", "method": self.name, "defense_config": cfg.to_dict(), "loop": LOOP_VERSION,
                        "data_sizes": sizes, **(run_info or {})},
                       trained_prompts=sorted({e.prompt for e in examples}))
        ctx.barrier()
        return out / "model"

    @classmethod
    def check_out(cls, out_dir: str | Path, resume: bool) -> None:
        super().check_out(out_dir, resume)
        out = Path(out_dir)
        if is_saved_model(out / "model"):
            raise ConfigError(f"{out / 'model'} holds a finished model already: give another --out (or delete it)")
        earlier = [p.name for p in (out / "log.jsonl", out / "checkpoints") if p.exists()]
        if earlier:
            raise ConfigError(f"{out} holds an earlier run ({', '.join(earlier)}); {cls.name} starts from scratch and "
                              "would overwrite it: give another --out (or delete that folder)")

    def fit(self, model: Any, tokenizer: Any, streams: dict[str, list[Example]], log_path: str | Path | None,
            desc: str = "refusal-sft", ctx: DistContext | None = None) -> tuple[Any, list[Example]]:
        """The training alone (no files but the per-step log): the trained model and the examples it saw, R then B."""
        examples = streams["refusal"] + streams["benign"]
        return finetune(model, tokenizer, examples, self.config, log_path, desc=desc, ctx=ctx).model, examples
