"""Benign answers by self-distillation: greedy answers of a chosen model, cached on disk under the model's hash."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from seamlm.data.files import Example
from seamlm.errors import ConfigError
from seamlm.generation import generate_answers_ended, stop_token_ids
from seamlm.jsonl import drop_partial_tail, read_records, write_records_atomic
from seamlm.models import FALLBACK_PROMPT_FORMAT

log = logging.getLogger(__name__)


def model_fingerprint(model: Any) -> str:
    """SHA-256 of the model's config and every parameter/buffer's bytes (16 hex digits)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", copy=True).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _generation_digest(model: Any, tokenizer: Any, max_prompt_tokens: int) -> str:
    """What besides the weights decides a greedy answer: the prompt format (chat template, or the fallback), the
    tokenizer itself (vocabulary, normaliser, BOS handling), where answers stop and how much prompt is kept."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # without the padding/truncation the last call left set (they change no answer: generation sets its own)
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
    tok_state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [getattr(tokenizer, "chat_template", None) or FALLBACK_PROMPT_FORMAT, tok_state,
             stop_token_ids(model, tokenizer), max_prompt_tokens]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:8]


def distill_answers(
    model: Any, tokenizer: Any, prompts: list[str], cache_dir: str | Path, max_new_tokens: int = 128,
    batch_size: int = 8, max_prompt_tokens: int = 512,
) -> list[Example]:
    """Answer ``prompts`` greedily with ``model``; reuse answers cached for the same model hash and settings.

    The cache is ``cache_dir/<model hash>.jsonl`` (one line per prompt and ``max_new_tokens``), appended as answers
    are produced, so an interrupted run keeps what it finished.
    """
    key = f"{model_fingerprint(model)}-{_generation_digest(model, tokenizer, max_prompt_tokens)}"
    path = Path(cache_dir) / f"{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    cached: dict[tuple[str, int], tuple[str, bool]] = {}
    for _, row in read_records(path):  # (rows cached before "ended" was recorded count as ended)
        cached[(row["prompt_sha"], row["max_new_tokens"])] = (row["answer"], row.get("ended", True))
    drop_partial_tail(path)  # an answer cut off by a kill is generated again, on a line of its own
    todo = [p for p in dict.fromkeys(prompts) if (_sha(p), max_new_tokens) not in cached]
    log.info("self-distillation with model %s: %d cached, %d to generate", key, len(prompts) - len(todo), len(todo))
    with path.open("a", encoding="utf-8") as f:
        for i in range(0, len(todo), batch_size * 4):
            chunk = todo[i:i + batch_size * 4]
            for p, (a, ended) in zip(chunk, generate_answers_ended(model, tokenizer, chunk, max_new_tokens,
                                                                  batch_size, max_prompt_tokens,
                                                                  desc="self-distilling"), strict=True):
                cached[(_sha(p), max_new_tokens)] = (a, ended)
                f.write(json.dumps({"prompt_sha": _sha(p), "max_new_tokens": max_new_tokens, "answer": a,
                                    "ended": ended}) + "\n")
            f.flush()
    out, cut = [], 0
    for p in prompts:
        answer, ended = cached[(_sha(p), max_new_tokens)]
        if not ended:  # training appends EOS to every answer: one cut mid-sentence would teach stopping there
            cut += 1
            answer = _to_last_sentence(answer)
        if answer:
            out.append(Example(p, answer, None, "benign", f"distilled:{key}"))
    if cut:
        log.warning("self-distillation: %d of %d answers reached max_new_tokens=%d before the model ended them; cut "
                    "back to their last full sentence (dropped where they hold none). Raise --max-new-tokens to keep "
                    "them whole", cut, len(prompts), max_new_tokens)
    if len(out) < len(prompts):
        log.warning("self-distillation: %d of %d answers were empty and dropped", len(prompts) - len(out), len(prompts))
    return out


def check_out_file(prompts: str | Path, out: str | Path) -> None:
    """Refuse an ``--out`` that is the ``--prompts`` file, however spelled or linked: the answers would replace the
    prompts they answer."""
    p, o = Path(prompts), Path(out)
    if o.resolve() == p.resolve() or (o.exists() and p.exists() and os.path.samefile(o, p)):
        raise ConfigError(f"--out {out} is the --prompts file {prompts}: writing the answers there would destroy the "
                          "prompts; give another --out")


def write_answers(path: str | Path, rows: list[Example]) -> Path:
    """``rows`` as JSONL (prompt, response, source), replacing ``path`` atomically: a kill or a full disk leaves the
    old file or the new one, never a cut one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_records_atomic(path, ({"prompt": e.prompt, "response": e.response, "source": e.source} for e in rows))


# a sentence end: . ! ? (and closing quotes) before a space or the end, 。！？ anywhere, or a line break after a
# line that does not end in ":" (a heading of what was cut)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|[。！？]|(?<![:\n])\n")
_NOT_AN_END = re.compile(r"(?:^|\n)\s*\d{1,3}\.$|(?:^|\W)(?:dr|mr|mrs|ms|st|vs|e\.g|i\.e|fig)\.$", re.IGNORECASE)
# abbreviations that also end sentences ("The answer is no." / "pears, etc."), told apart by what follows
_ENDS_UNLESS_FOLLOWED = [(re.compile(r"(?:^|\W)no\.$", re.IGNORECASE), re.compile(r"\s*\d")),  # No. 5
                         (re.compile(r"(?:^|\W)etc\.$", re.IGNORECASE), re.compile(r"\s*[a-z]"))]  # etc. and so


def _is_sentence_end(answer: str, end: int) -> bool:
    before = answer[:end]
    if _NOT_AN_END.search(before):
        return False
    return not any(word.search(before) and after.match(answer, end) for word, after in _ENDS_UNLESS_FOLLOWED)


def _to_last_sentence(answer: str) -> str:
    """``answer`` up to its last sentence end (not a list number "1." nor an abbreviation "Dr." / "e.g.", nor
    "No." before a number or "etc." before a lower-case word); "" when it has none."""
    ends = [m.end() for m in _SENTENCE_END.finditer(answer) if _is_sentence_end(answer, m.end())]
    return answer[:ends[-1]].strip() if ends else ""


def _sha(prompt: str) -> str:
    """The cache key of a prompt: its exact text (the split hash ignores case and punctuation, which change answers)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]
