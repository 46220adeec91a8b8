"""Zero-shot utility (ZS): log-likelihood multiple choice over offline task data, scored like lm-evaluation-harness.

A task is data + a scoring rule: ``doc -> MCItem(context(s), choices, gold)``. For each choice the model scores
log P(target_delimiter + choice | context) summed over the choice's tokens. ``acc`` takes the argmax of that sum;
``acc_norm`` divides it by the choice's length in characters first (lm-eval's ``acc_norm``). The prompts follow the
lm-eval task YAMLs of the same name. ``run_lm_eval`` runs lm-eval itself on an already loaded model.
"""

from __future__ import annotations

import errno
import inspect
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from seamlm.data.format import with_bos
from seamlm.data.sources import load_source
from seamlm.defense.losses import ModelParts
from seamlm.errors import ConfigError, DataError
from seamlm.evaluate.stats import mean_stderr
from seamlm.models import ensure_pad_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MCItem:
    contexts: tuple[str, ...]  # one per choice (winogrande) or a single shared context
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "

    def context(self, i: int) -> str:
        return self.contexts[i] if len(self.contexts) > 1 else self.contexts[0]


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _arc(d: dict) -> MCItem:
    labels = list(d["choices"]["label"])
    return MCItem((f"Question: {d['question']}\nAnswer:",), tuple(d["choices"]["text"]), labels.index(d["answerKey"]))


def _hellaswag(d: dict) -> MCItem:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return MCItem((_hellaswag_clean(d["activity_label"] + ": " + ctx),),
                  tuple(_hellaswag_clean(e) for e in d["endings"]), int(d["label"]))


def _winogrande(d: dict) -> MCItem:
    i = d["sentence"].index("_")
    contexts = tuple(d["sentence"][:i] + opt for opt in (d["option1"], d["option2"]))
    continuation = d["sentence"][i + 1:].strip()
    return MCItem(contexts, (continuation, continuation), int(d["answer"]) - 1)


def _piqa(d: dict) -> MCItem:
    return MCItem((f"Question: {d['goal']}\nAnswer:",), (d["sol1"], d["sol2"]), int(d["label"]))


def _boolq(d: dict) -> MCItem:
    return MCItem((f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",), ("no", "yes"), int(bool(d["answer"])))


def _openbookqa(d: dict) -> MCItem:
    labels = list(d["choices"]["label"])
    return MCItem((d["question_stem"],), tuple(d["choices"]["text"]), labels.index(d["answerKey"].strip()))


def _sciq(d: dict) -> MCItem:
    return MCItem((f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",),
                  (d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]), 3)


def _sst2(d: dict) -> MCItem:
    return MCItem((f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",),
                  ("negative", "positive"), int(d["label"]))


def _mmlu(d: dict) -> MCItem:
    subject = d.get("_subset", "").replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    opts = "".join(f"\n{k}. {c}" for k, c in zip("ABCD", d["choices"], strict=False))
    return MCItem((f"{header}{d['question'].strip()}{opts}\nAnswer:",), ("A", "B", "C", "D"), int(d["answer"]))


@dataclass(frozen=True)
class Task:
    name: str
    source: str
    to_item: Callable[[dict], MCItem]
    chance: float  # accuracy of uniform guessing


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "olmo-arc_easy", _arc, 0.25),
    Task("arc_challenge", "olmo-arc_challenge", _arc, 0.25),
    Task("hellaswag", "olmo-hellaswag", _hellaswag, 0.25),
    Task("winogrande", "olmo-winogrande", _winogrande, 0.5),
    Task("piqa", "olmo-piqa", _piqa, 0.5),
    Task("boolq", "olmo-boolq", _boolq, 0.5),
    Task("openbookqa", "olmo-openbookqa", _openbookqa, 0.25),
    Task("sciq", "olmo-sciq", _sciq, 0.25),
    Task("sst2", "olmo-sst2", _sst2, 0.5),
    Task("mmlu", "olmo-mmlu", _mmlu, 0.25),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown zero-shot task '{name}'; available: {', '.join(TASKS)}")
    return TASKS[name]


def task_items(name: str, limit: int | None, seed: int = 0) -> list[MCItem]:
    """The task's items, a seeded subsample of ``limit`` when given (the same items for every model)."""
    task = get_task(name)
    docs = load_source(task.source)
    if limit and limit < len(docs):
        docs = random.Random(seed).sample(docs, limit)
    return [task.to_item(d) for d in docs]


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, the pair is encoded as one string
    and the continuation is what follows the context's own encoding (right for SentencePiece merges too)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ctx = with_bos(tokenizer, ctx)  # one BOS, also when a chat-formatted context (FS) brings its own
    return (ctx or [tokenizer.eos_token_id]), cont


def _fit_positions(encoded: list[tuple[list[int], list[int]]], limit: int | None,
                   desc: str) -> list[tuple[list[int], list[int]]]:
    """Cut each context from the left so that the tokens fed to the model fit its ``limit`` positions, as lm-eval
    does: it feeds ``(context + continuation)[-(limit + 1):][:-1]`` — the last continuation token is predicted,
    never fed, so ``limit + 1`` tokens fit. Past its trained length a model either fails (absolute positions) or
    scores positions it never saw (RoPE)."""
    if not isinstance(limit, int) or limit <= 0:
        return encoded
    too_long = [len(c) for _, c in encoded if len(c) > limit]  # (at least one context token must predict its first)
    if too_long:
        raise ConfigError(f"{desc}: a choice alone has {max(too_long)} tokens, the model takes {limit} positions: "
                          "score it with a model of a longer context, or drop the task")
    keep = limit + 1
    cut = sum(len(x) + len(c) > keep for x, c in encoded)
    if not cut:
        return encoded
    log.warning("%s: %d of %d choices exceed the model's %d positions: their contexts are cut from the left, as "
                "lm-eval does", desc, cut, len(encoded), limit)
    return [(x[len(x) + len(c) - keep:] if len(x) + len(c) > keep else x, c) for x, c in encoded]


@torch.no_grad()
def choice_loglikelihoods(model: Any, tokenizer: Any, items: list[MCItem], batch_size: int = 16,
                          desc: str = "zero-shot",
                          encoded: list[tuple[list[int], list[int]]] | None = None,
                          share_contexts: bool = True) -> list[list[float]]:
    """Σ log P(continuation tokens | context) for every choice of every item (batched, right padded).
    ``encoded``: (context ids, continuation ids) per choice in item order, for callers that must score the tokens
    they trained on (FS); default lm-eval's split of the text (:func:`_encode_pair`).

    The choices of one context share its forward pass: the context and its first choice go through the model once
    (as one row), the other choices only through their own tokens, attending to the context's cached keys and
    values. Same scores as one row per choice up to float rounding, for a fraction of the tokens where the context
    is long (SciQ's passages, BoolQ's, SST-2's few-shot prompts). ``share_contexts=False``: one row per choice
    (lm-eval's way; ``benchmarks/zero_shot_throughput.py`` times the two)."""
    if encoded is None:
        requests = [(it.context(i), it.delimiter + c) for it in items for i, c in enumerate(it.choices)]
        encoded = [_encode_pair(tokenizer, ctx, cont) for ctx, cont in requests]
    elif len(encoded) != sum(len(it.choices) for it in items):
        raise ValueError(f"encoded holds {len(encoded)} pairs for {sum(len(it.choices) for it in items)} choices")
    encoded = _fit_positions(encoded, getattr(getattr(model, "config", None), "max_position_embeddings", None), desc)
    model.eval()
    window = _attention_window(model)
    if share_contexts and window is not None and \
            max((len(c) for c, _ in encoded), default=0) + max((len(t) for _, t in encoded), default=0) >= window:
        # a sliding-window (or chunked) cache evicts keys once a row outgrows the window, and a padded shared row
        # would keep padding and the first choice's tokens instead of the context's end: one row per choice
        share_contexts = False
    scorer = _SharedContextScorer(model, tokenizer.pad_token_id)
    groups: dict[tuple[int, ...] | int, list[int]] = {}
    for k, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx) if share_contexts else k, []).append(k)
    members = list(groups.values())
    scores: list[float] = [0.0] * len(encoded)
    batches = _context_batches([len(encoded[ks[0]][0]) + len(encoded[ks[0]][1]) for ks in members], batch_size)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=len(batches) <= 1):
        for k, v in scorer.score([members[g] for g in batch], encoded):
            scores[k] += v
    out, pos = [], 0
    for it in items:
        out.append(scores[pos:pos + len(it.choices)])
        pos += len(it.choices)
    return out


def _attention_window(model: Any) -> int | None:
    """The fewest positions any layer attends over (a sliding window or an attention chunk); None when every
    layer attends to the whole sequence. 0: some layer of a kind not known here (no sharing then)."""
    config = getattr(model, "config", None)
    if config is None:
        return 0
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = set(getattr(config, "layer_types", None) or ())
    window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    if not kinds:  # configs without layer types (Mistral) slide on every layer when a window is set
        return window if window and getattr(config, "use_sliding_window", True) is not False else None
    limits = [window if k == "sliding_attention" else chunk if k == "chunked_attention" else 0
              for k in kinds - {"full_attention"}]
    return min((x or 0 for x in limits), default=None)


def _context_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` (tokens of a context's first row), longest first, in batches of at most
    ``batch_size`` rows whose padded size stays within ``batch_size`` × 64 tokens: on a CPU the cost follows the
    padded tokens, so one 550-token SciQ passage goes alone rather than pad fifteen short ones to its length."""
    order = sorted(range(len(lengths)), key=lambda g: -lengths[g])
    batches: list[list[int]] = []
    for g in order:
        if batches and len(batches[-1]) < batch_size and \
                (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_size * 64:
            batches[-1].append(g)
        else:
            batches.append([g])
    return batches


class _SharedContextScorer:
    """Scores the choices of a batch of contexts in two forward passes (see :func:`choice_loglikelihoods`)."""

    def __init__(self, model: Any, pad_token_id: int):
        self.model, self.pad = model, pad_token_id
        self.parts = ModelParts.of(model)
        self.device = next(model.parameters()).device
        # transformers 5.x renamed the decoder's cache argument (past_key_values -> cache)
        names = inspect.signature(self.parts.decoder.forward).parameters
        self.cache_arg = "cache" if "cache" in names else "past_key_values"

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        return ids, mask

    def score(self, groups: list[list[int]], encoded: list[tuple[list[int], list[int]]]) -> list[tuple[int, float]]:
        """(choice index, Σ log p) for every choice of ``groups`` (each: the choices of one context)."""
        firsts = [encoded[ks[0]] for ks in groups]
        ids, mask = self._padded([(ctx + cont)[:-1] for ctx, cont in firsts])  # the last token is only predicted
        cache = DynamicCache(config=self.model.config)
        hidden = self.parts.decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    use_cache=True, **{self.cache_arg: cache}).last_hidden_state
        # the LM head only at the continuation positions: the full-vocabulary logits elsewhere are never needed
        rows, positions, targets, owners = [], [], [], []
        for r, ks in enumerate(groups):
            n_ctx, first = len(encoded[ks[0]][0]), encoded[ks[0]][1]
            for k in ks:  # every choice's first token is predicted at the context's last position
                cont = first if k == ks[0] else encoded[k][1][:1]
                rows += [r] * len(cont)
                positions += range(n_ctx - 1, n_ctx - 1 + len(cont))
                targets += cont
                owners += [k] * len(cont)
        states = [hidden[rows, positions]]
        rest = [(r, k) for r, ks in enumerate(groups) for k in ks[1:] if len(encoded[k][1]) > 1]
        if rest:
            # the other choices attend to their context's cached positions only, not to the first choice's tokens
            context_mask = torch.zeros_like(mask)
            for r, ks in enumerate(groups):
                context_mask[r, : len(encoded[ks[0]][0])] = 1
            cache_rows = torch.tensor([r for r, _ in rest])
            cache.reorder_cache(cache_rows.to(self.device))
            ids2, mask2 = self._padded([encoded[k][1][:-1] for _, k in rest])
            n_ctx = torch.tensor([len(encoded[k][0]) for _, k in rest])
            position_ids = n_ctx[:, None] + torch.arange(ids2.shape[1])[None]
            hidden2 = self.parts.decoder(input_ids=ids2.to(self.device), position_ids=position_ids.to(self.device),
                                         attention_mask=torch.cat([context_mask[cache_rows], mask2], 1).to(self.device),
                                         use_cache=True, **{self.cache_arg: cache}).last_hidden_state
            rows, positions = [], []
            for r2, (_, k) in enumerate(rest):
                cont = encoded[k][1][1:]
                rows += [r2] * len(cont)
                positions += range(len(cont))
                targets += cont
                owners += [k] * len(cont)
            states.append(hidden2[rows, positions])
        logp = F.log_softmax(self.parts.logits(torch.cat(states)).float(), -1)
        values = logp[torch.arange(len(targets), device=logp.device), torch.tensor(targets, device=logp.device)]
        return list(zip(owners, values.tolist(), strict=True))


def score_items(items: list[MCItem], lls: list[list[float]]) -> dict[str, float]:
    """lm-eval's rule: acc = argmax Σlog p; acc_norm = argmax Σlog p / len(choice in characters). A non-finite
    log-likelihood (a model with NaN weights) makes both NaN: argmax over NaN would pick choice 0 and pass a
    broken model off as one scoring the share of items whose answer is the first choice."""
    if any(not math.isfinite(v) for ll in lls for v in ll):
        return {"acc": math.nan, "acc_norm": math.nan, "n": len(items), "acc_stderr": math.nan}
    hits, norm_hits = [], []
    for it, ll in zip(items, lls, strict=True):
        hits.append(float(max(range(len(ll)), key=lambda i: ll[i]) == it.gold))
        normed = [v / max(len(c), 1) for v, c in zip(ll, it.choices, strict=True)]
        norm_hits.append(float(max(range(len(ll)), key=lambda i: normed[i]) == it.gold))
    n = len(items)
    return {"acc": sum(hits) / n, "acc_norm": sum(norm_hits) / n, "n": n, "acc_stderr": mean_stderr(hits)}


def evaluate_zero_shot(model: Any, tokenizer: Any, tasks: tuple[str, ...], limit: int | None = 200,
                       seed: int = 0, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Per task ``{"acc", "acc_norm", "n", "acc_stderr", "chance"}`` plus ``"mean"`` (mean acc over tasks, its
    standard error √(Σ stderr²)/T over independent tasks, and its chance)."""
    ensure_pad_token(tokenizer)
    results = {}
    for name in tasks:
        items = task_items(name, limit, seed)
        res = score_items(items, choice_loglikelihoods(model, tokenizer, items, batch_size, desc=f"ZS {name}"))
        results[name] = {**res, "chance": get_task(name).chance}
    results["mean"] = {
        "acc": sum(results[t]["acc"] for t in tasks) / len(tasks),
        "acc_norm": sum(results[t]["acc_norm"] for t in tasks) / len(tasks),
        "chance": sum(results[t]["chance"] for t in tasks) / len(tasks),
        "n": sum(results[t]["n"] for t in tasks),
        "acc_stderr": math.sqrt(sum(results[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks),
    }
    return results


def lm_eval_task_manager(tasks: list[str] | tuple[str, ...], include_path: str | Path | None = None) -> Any:
    """lm-eval's ``TaskManager`` (its index plus the YAMLs under ``include_path``) after checking that every name in
    ``tasks`` is a task or a group lm-eval knows. Called before any model runs, so a wrong name costs seconds, not
    an attack: a *tag* (e.g. ``ai2_arc``) is refused here since lm-eval reports its scores only under its member
    tasks."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError("lm-eval tasks need lm-evaluation-harness: pip install lm_eval (and Hub access for its "
                        "task data); the built-in evaluate_zero_shot works offline") from exc
    if include_path is not None and not Path(include_path).exists():
        raise DataError(f"lm-eval include_path {include_path} does not exist: give the folder of your task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(f"lm-eval does not know the task(s) {', '.join(unknown)}; check the names "
                        "(`lm_eval --tasks list`) or the YAMLs under include_path")
    tags = [t for t in tasks if t in manager.all_tags]
    if tags:
        raise DataError(f"{', '.join(tags)}: lm-eval tag(s), which have no score of their own (lm-eval reports "
                        "each member task); name the member tasks instead (`lm_eval --tasks list`)")
    return manager


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None,
                batch_size: int = 8, include_path: str | Path | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness's ``simple_evaluate`` on an already loaded model; returns its ``results``.

    ``tasks`` are lm-eval task or group names (checked by :func:`lm_eval_task_manager`): its own (their data
    usually come from the Hub) or tasks defined by YAML files under ``include_path`` — e.g. a
    ``dataset_path: json`` task over local files, which runs offline.
    """
    manager = lm_eval_task_manager(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # (per-sample logs are not returned: keeping them costs memory on large groups such as MMLU)
    try:
        return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)["results"]
    except OSError as exc:  # a task's data from the Hub, offline (datasets raises ConnectionError, an OSError)
        if exc.errno == errno.ENOSPC:
            raise  # a full disk while caching: the CLI says so, not "offline"
        raise DataError(f"lm-eval could not load the data of {', '.join(tasks)}: {exc}. lm-eval's own tasks read "
                        "their data from the Hub; offline, define the task in a YAML over local files "
                        "(dataset_path: json) under include_path, or use the built-in evaluator (zs_tasks)") from exc
