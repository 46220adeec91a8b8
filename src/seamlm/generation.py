"""Batched greedy generation with left padding and the KV cache (used by self-distillation and evaluation)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from seamlm.data.format import encode_prompts

# generate() applies the decoding rules a model's generation_config ships (Qwen2.5-Instruct: repetition_penalty 1.05)
# even with do_sample=False; HS answers and distilled answers are plain greedy decoding, so every rule that changes
# the argmax is switched off here (explicit arguments override the model's config, None included)
PLAIN_GREEDY: dict[str, Any] = {
    "do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "penalty_alpha": None, "dola_layers": None, "stop_strings": None,
}


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 50, batch_size: int = 8,
    max_prompt_tokens: int = 512, desc: str = "generating", template: str = "chat",
) -> list[str]:
    """Greedy answers to ``prompts`` (formatted with ``template``: the chat template by default), decoded without
    special tokens."""
    return [a for a, _ in generate_answers_ended(model, tokenizer, prompts, max_new_tokens, batch_size,
                                                 max_prompt_tokens, desc, template)]


@torch.no_grad()
def generate_answers_ended(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 50, batch_size: int = 8,
    max_prompt_tokens: int = 512, desc: str = "generating", template: str = "chat",
) -> list[tuple[str, bool]]:
    """As :func:`generate_answers`, each answer with whether the model ended it (a stop token) rather than the
    ``max_new_tokens`` budget."""
    device = next(model.parameters()).device
    stop = stop_token_ids(model, tokenizer)
    answers: list[tuple[str, bool]] = []
    with eval_mode(model):
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=len(prompts) <= batch_size):
            enc = encode_prompts(tokenizer, prompts[i:i + batch_size], template, max_prompt_tokens, device)
            out = model.generate(
                **enc, **PLAIN_GREEDY, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop, use_cache=True,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            ended = (torch.isin(new, torch.tensor(stop, device=new.device)).any(dim=1).tolist() if stop
                     else [False] * len(new))
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers.extend((t.strip(), e) for t, e in zip(texts, ended, strict=True))
    return answers


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode (no dropout) for the block, then back in the mode it was in, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int] | None:
    """Where an answer ends: the model's generation-config end tokens and the tokenizer's EOS, which training
    appends to every answer (they differ for some models; stopping at only one lets answers run on)."""
    ids: list[int] = []
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids += [v] if isinstance(v, int) else list(v or [])
    return sorted(set(ids)) or None
