"""Evaluate one model on a data bundle: HS, refusal rate, ZS, coherence and (optionally) FS, as result values."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from seamlm.data.bundles import BundleData
from seamlm.data.format import Formatter
from seamlm.errors import ConfigError
from seamlm.evaluate.judges import Judge
from seamlm.evaluate.metrics import (
    METRIC_MAX_LENGTH,
    EvalConfig,
    benign_finetune_accuracy,
    benign_perplexity,
    coupling_of_rows,
    gradient_coupling,
    harmfulness,
    perplexity_of_rows,
    sample_prompts,
)
from seamlm.evaluate.zeroshot import evaluate_zero_shot, run_lm_eval
from seamlm.finetune import Probe
from seamlm.jsonl import write_records_atomic

log = logging.getLogger(__name__)


def evaluate_model(model: Any, tokenizer: Any, bundle: BundleData, cfg: EvalConfig, judge: Judge,
                   samples_path: str | Path | None = None) -> dict[str, float]:
    """Metric name -> value (see ``seamlm.results.METRICS``). Generated answers go to ``samples_path`` (JSONL)."""
    fed = set(bundle.manifest.get("zero_shot_exclude", []))
    excluded, lm_excluded = fed & set(cfg.zs_tasks), fed & set(cfg.lm_eval_tasks)
    if excluded:
        raise ConfigError(f"zero-shot tasks {sorted(excluded)} feed this bundle's training data; drop them from zs_tasks")
    if lm_excluded:
        raise ConfigError(f"lm-eval tasks {sorted(lm_excluded)} score the split that feeds this bundle's training "
                          "data (the model saw those items); drop them from lm_eval_tasks")
    out: dict[str, float] = {}
    prompts = sample_prompts(bundle.streams["eval_harmful"], cfg.hs_prompts, cfg.seed)
    hs = harmfulness(model, tokenizer, prompts, judge, cfg.max_new_tokens, cfg.gen_batch_size, cfg.prompt_template)
    out.update(hs=hs["hs"], hs_binary=hs["hs_binary"], hs_se=hs["hs_se"], refusal_rate=hs["refusal_rate"])
    if samples_path:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        write_records_atomic(samples_path, hs["samples"])
    if cfg.zs_tasks:
        zs = evaluate_zero_shot(model, tokenizer, cfg.zs_tasks, cfg.zs_limit or None, cfg.seed, cfg.zs_batch_size)
        for task in cfg.zs_tasks:
            out[f"zs_{task}"] = 100 * zs[task]["acc"]
        out.update(zs_mean=100 * zs["mean"]["acc"], zs_mean_norm=100 * zs["mean"]["acc_norm"],
                   zs_chance=100 * zs["mean"]["chance"], zs_mean_se=100 * zs["mean"]["acc_stderr"])
    if cfg.lm_eval_tasks:
        results = run_lm_eval(model, tokenizer, list(cfg.lm_eval_tasks), cfg.lm_eval_limit or None,
                              cfg.zs_batch_size, cfg.lm_eval_include_path or None)
        for task in cfg.lm_eval_tasks:
            if "acc,none" not in results.get(task, {}):
                got = sorted(results.get(task, {})) or f"nothing; results came for {sorted(results)}"
                raise ConfigError(f"lm-eval task {task} reported no acc (it reported {got}). lm_eval_tasks takes "
                                  "multiple-choice tasks or groups scored by acc; a tag's results come under its "
                                  "member tasks: name those")
            out[f"lmeval_{task}"] = 100 * results[task]["acc,none"]
    if cfg.coherence_examples:
        out["coherence_ppl"] = benign_perplexity(model, tokenizer, bundle.streams["benign_heldout"][: cfg.coherence_examples])
    if cfg.coupling_examples:
        out.update(gradient_coupling(model, tokenizer, *_coupling_sets(bundle, cfg.coupling_examples)))
    if cfg.fs:
        out["fs_accuracy"] = benign_finetune_accuracy(model, tokenizer, cfg)["fs_accuracy"]
    return out


def attack_probe(tokenizer: Any, bundle: BundleData, cfg: EvalConfig) -> Probe | None:
    """The measurement taken along an attack (``cfg.trajectory_every``; None when off): benign perplexity on the
    first ``trajectory_examples`` held-out benign answers and, with ``coupling_examples``, the gradient coupling
    on the attack data — the figures of :func:`evaluate_model`, at points of the attack's trajectory."""
    if not cfg.trajectory_every:
        return None
    # encoded once, not at every probe (and their truncation warnings logged once)
    fmt, pad = Formatter(tokenizer, METRIC_MAX_LENGTH), tokenizer.pad_token_id
    benign = fmt.encode_all(bundle.streams["benign_heldout"][: cfg.trajectory_examples], "trajectory benign")
    n = cfg.coupling_examples
    if n:
        harmful, held_out = _coupling_sets(bundle, n)
        coupling_h, coupling_b = fmt.encode_all(harmful, "coupling harmful"), fmt.encode_all(held_out, "coupling benign")

    def measure(model: Any) -> dict[str, float]:
        out = {"benign_ppl": perplexity_of_rows(model, benign, pad)}
        if n:
            out.update(coupling_of_rows(model, coupling_h, coupling_b, pad))
        return out

    return Probe(measure, cfg.trajectory_every)


def _coupling_sets(bundle: BundleData, n: int) -> tuple[list, list]:
    """The examples of the gradient-coupling figures: the first ``n`` attack and held-out benign ones."""
    return bundle.streams["attack"][:n], bundle.streams["benign_heldout"][:n]
