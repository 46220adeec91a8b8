"""Prompt formatting, answer-only label masks and padding collators.

The answer mask comes from the length of the tokenised prompt: ``ids = prompt_ids + answer_ids + [eos]`` and
labels are -100 on the prompt part. No token-by-token comparison of two sequences (a defect of the reference code)
and no special meaning for token id 0.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from jinja2.exceptions import TemplateError, TemplateSyntaxError

from seamlm.data.files import Example
from seamlm.errors import ConfigError, ModelLoadError
from seamlm.models import FALLBACK_PROMPT_FORMAT, ensure_pad_token

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


#: Prompt templates by name. ``chat`` is the model's own chat template (the fallback format when it has none); the
#: others ignore the chat template — an attacker's "template shift" trains and queries the model through them.
PROMPT_TEMPLATES = {
    "chat": None,
    "plain": FALLBACK_PROMPT_FORMAT,
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n",
    "raw": "{prompt}\n",
}


#: the date a chat template that writes one (Llama 3's "Today Date: …") is given, instead of today's: the same prompt
#: on every day, so training, a resume, generation, scoring and the distillation cache all see one text (Llama 3.1's
#: templates' own fallback date)
TEMPLATE_DATE = "26 Jul 2024"


def check_template(name: str) -> str:
    if name not in PROMPT_TEMPLATES:
        raise ConfigError(f"unknown prompt template '{name}'; choose one of {', '.join(PROMPT_TEMPLATES)}")
    return name


def prompt_text(tokenizer: Any, prompt: str, template: str = "chat") -> str:
    """The text the model sees before its answer: the chat template if it has one (else the fallback format), or
    the named template of :data:`PROMPT_TEMPLATES`."""
    if check_template(template) != "chat":
        return PROMPT_TEMPLATES[template].format(prompt=prompt)
    if getattr(tokenizer, "chat_template", None):
        return _chat_prompt(tokenizer, prompt, getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return FALLBACK_PROMPT_FORMAT.format(prompt=prompt)


def check_chat_template(tokenizer: Any, model: str) -> bool:
    """Whether ``tokenizer`` has a chat template (else prompts use the fallback format), rendered once on a
    one-turn prompt: a template that cannot render one (a syntax error, or its own ``raise_exception``) is a
    :class:`ModelLoadError` naming ``model`` now, before any weights load, not a jinja2 traceback at the first
    prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    _chat_prompt(tokenizer, "Hello", model)
    return True


def _chat_prompt(tokenizer: Any, prompt: str, model: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False,
            date_string=TEMPLATE_DATE,
        )
    except (ImportError, MemoryError):  # transformers' or the machine's, not the template's
        raise
    except Exception as exc:  # the template is the model's data: any error it raises is its fault
        # jinja2's own errors, or a Python error of an expression in the template (`{{ m['content'] + 1 }}`,
        # `{{ 1 / 0 }}`, a macro that recurses without end)
        message = exc.message if isinstance(exc, TemplateError) else f"{type(exc).__name__}: {exc}"
        what = " ".join(str(message or type(exc).__name__).split())  # one line, whatever the template wrote
        what = f"syntax error at line {exc.lineno}: {what}" if isinstance(exc, TemplateSyntaxError) else \
            f"it fails with: {what}"
        raise ModelLoadError(
            f"the chat template of model '{model}' cannot format a prompt ({what}). Fix the template (the model's "
            "chat_template.jinja, or \"chat_template\" in its tokenizer_config.json), or delete it so that seamlm "
            f"prompts the model in its plain fallback format {FALLBACK_PROMPT_FORMAT!r}") from None


def with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """``ids`` started as the model's tokenizer starts text: with BOS where it adds one (``add_bos_token``: Llama,
    Mistral, Gemma) and the text brought none (a chat template that writes ``{{ bos_token }}`` brings its own).
    Every prompt is encoded with ``add_special_tokens=False`` and then this, so training, generation and scoring
    see the same single BOS whatever the template."""
    bos = tokenizer.bos_token_id
    if bos is None or not adds_bos(tokenizer) or (ids and ids[0] == bos):
        return list(ids)
    return [bos, *ids]


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts encoded text with BOS — by what it does (``add_bos_token`` may be unset where the
    ``tokenizer.json`` post-processor adds it, as in Llama-3-style files), checked once per tokenizer."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    with_special = tokenizer("a")["input_ids"]
    adds = bool(with_special) and with_special[0] == tokenizer.bos_token_id and \
        len(with_special) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    with contextlib.suppress(TypeError):  # not weak-referenceable: checked again next time
        _ADDS_BOS[tokenizer] = adds
    return adds


_JOINER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def answer_joiner(tokenizer: Any) -> str:
    """What goes between a prompt ending in a word ("Answer:") and its answer, encoded apart, so that the two
    encodings add up to the encoding of the joined text "Answer: word": ``" "`` for byte-level BPE (GPT-2,
    Llama 3, SmolLM2: the space belongs to the word's token), ``""`` for SentencePiece with a dummy prefix (Llama 2:
    every encoded text starts with "▁"). Found by what the tokenizer does, once per tokenizer; ``" "`` when neither
    adds up exactly."""
    try:
        return _JOINER[tokenizer]
    except (KeyError, TypeError):
        pass

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix, word = "Answer:", "Yes"
    whole = enc(f"{prefix} {word}")
    joiner = next((j for j in (" ", "") if enc(prefix) + enc(j + word) == whole), None)
    if joiner is None:
        log.warning("%s: neither ' ' nor '' joins 'Answer:' and an answer as the tokenizer encodes the joined text; "
                    "answers after the fallback format start with ' '", type(tokenizer).__name__)
        joiner = " "
    with contextlib.suppress(TypeError):
        _JOINER[tokenizer] = joiner
    return joiner


def uses_fallback(tokenizer: Any, template: str = "chat") -> bool:
    """Whether prompts of ``template`` are the fallback format (the ``plain`` template, or ``chat`` for a tokenizer
    without a chat template), whose answer follows "Answer:" on the same line."""
    return check_template(template) == "plain" or (template == "chat" and not getattr(tokenizer, "chat_template", None))


def answer_ids(tokenizer: Any, answer: str, template: str = "chat") -> list[int]:
    """Token ids of ``answer`` after a prompt of ``template``, encoded on their own (splitting a joined encoding
    would cut SentencePiece merges): after the fallback format's "Answer:" without leading whitespace and with
    :func:`answer_joiner` in front;
    after a chat template's generation prompt (a newline or a special token ends it, as in the rendered
    conversation) or another template's newline, as they are."""
    if uses_fallback(tokenizer, template):  # leading whitespace would put a lone space token back
        answer = answer.lstrip()
        answer = answer_joiner(tokenizer) + answer if answer else answer
    return tokenizer(answer, add_special_tokens=False)["input_ids"]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text (:func:`prompt_text`), with the model's BOS rule (:func:`with_bos`)."""
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def keep_last(tokenizer: Any, ids: list[int], n: int) -> list[int]:
    """The last ``n`` of a prompt's ids — a too-long prompt loses its start, never the generation prompt at its
    end — with its BOS kept in front where the tokenizer adds one (:func:`adds_bos`). A token that is only *named*
    BOS and starts every chat turn (SmolLM2's ``<|im_start|>``) is cut like any other."""
    if len(ids) <= n:
        return list(ids)
    if n > 1 and ids and ids[0] == tokenizer.bos_token_id and adds_bos(tokenizer):
        return [ids[0], *ids[len(ids) - n + 1:]]
    return list(ids[len(ids) - n:])


def encode_prompts(tokenizer: Any, prompts: list[str], template: str = "chat", max_tokens: int | None = None,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of formatted prompts (``input_ids``, ``attention_mask``) whose last position is each
    prompt's last token: for generation and last-token states. A prompt longer than ``max_tokens`` loses its start,
    never the generation prompt at its end."""
    ensure_pad_token(tokenizer)
    ids = [encode_text(tokenizer, prompt_text(tokenizer, p, template)) for p in prompts]
    if max_tokens:
        ids = [keep_last(tokenizer, x, max_tokens) for x in ids]
    batch = collate([TokenizedExample(x, x) for x in ids], tokenizer.pad_token_id, "left", device)
    del batch["labels"]
    return batch


#: what a too-long training example loses first: the answer's end (keeping the prompt whole) or the prompt's start
TRUNCATE_FIRST = ("answer", "prompt")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Formatter:
    """Tokenise examples into ``input_ids`` + answer-only ``labels``.

    ``mask_prompt=False`` trains on every token (the reference code does this for the benign stream).
    ``template`` names the prompt template (:data:`PROMPT_TEMPLATES`; ``chat`` = the model's own).
    An example longer than ``max_length`` is cut as ``truncate_first`` says (:data:`TRUNCATE_FIRST`): ``answer``
    keeps the prompt whole and cuts the answer's end, down to ``min_answer_tokens``, before the prompt's start;
    ``prompt`` cuts the prompt's start (after its BOS, if it has one) down to half of ``max_length`` before the
    answer's end. ``truncated``/``answer_cut``/``answer_lost`` count what was cut so callers can log it.
    """

    tokenizer: Any
    max_length: int = 256
    mask_prompt: bool = True
    min_answer_tokens: int = 8
    template: str = "chat"
    truncate_first: str = "answer"
    truncated: int = field(default=0, init=False)
    answer_cut: int = field(default=0, init=False)
    answer_lost: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.truncate_first not in TRUNCATE_FIRST:
            raise ConfigError(f"truncate_first must be one of {', '.join(TRUNCATE_FIRST)}, not {self.truncate_first!r}")
        ensure_pad_token(self.tokenizer)  # a user's tokenizer (Python API) may have none; batches need one

    def __call__(self, example: Example) -> TokenizedExample:
        tok = self.tokenizer
        p_ids = encode_text(tok, prompt_text(tok, example.prompt, self.template))
        a_ids = answer_ids(tok, example.response, self.template)
        if tok.eos_token_id is not None:
            a_ids = a_ids + [tok.eos_token_id]
        if len(p_ids) + len(a_ids) > self.max_length:
            self.truncated += 1
            if self.truncate_first == "prompt":  # the prompt yields down to half the budget, then the answer
                keep_answer = self.max_length - min(len(p_ids), max(self.max_length // 2, self.max_length - len(a_ids)))
            else:
                keep_answer = max(self.min_answer_tokens, self.max_length - len(p_ids))
            keep_answer = min(keep_answer, len(a_ids), self.max_length - 1)  # at least one prompt token
            if keep_answer < len(a_ids):
                self.answer_cut += 1
                # only when max_length leaves no room for min_answer_tokens after one prompt token
                self.answer_lost += keep_answer < self.min_answer_tokens
            a_ids = a_ids[:keep_answer]
            p_ids = keep_last(tok, p_ids, self.max_length - len(a_ids))
        labels = ([IGNORE_INDEX] * len(p_ids) if self.mask_prompt else list(p_ids)) + list(a_ids)
        return TokenizedExample(list(p_ids) + list(a_ids), labels)

    def encode_all(self, examples: list[Example], name: str = "data") -> list[TokenizedExample]:
        before, cut_before, lost_before = self.truncated, self.answer_cut, self.answer_lost
        out = [self(e) for e in examples]
        if self.truncated > before:
            log.warning(
                "%s: %d of %d examples exceeded max_length=%d and were truncated (truncate_first=%s; the answer's "
                "end cut in %d of them)",
                name, self.truncated - before, len(examples), self.max_length, self.truncate_first,
                self.answer_cut - cut_before,
            )
        if self.answer_lost > lost_before:
            log.warning(
                "%s: in %d examples fewer than %d answer tokens fit in max_length=%d; raise max_length",
                name, self.answer_lost - lost_before, self.min_answer_tokens, self.max_length,
            )
        return out


def answer_token_count(batch: dict[str, Any]) -> int:
    """Tokens the answer-only CE of ``batch`` averages over (labels after the causal shift, not -100)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate(batch: list[TokenizedExample], pad_token_id: int, padding_side: str = "right",
            device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence (right padding for training, left for generation), on ``device`` if given."""
    if pad_token_id is None:
        raise ConfigError("cannot pad a batch: the tokenizer has no pad token (seamlm.models.ensure_pad_token sets "
                          "its EOS token as one; load_model and Formatter call it)")
    width = max(len(b.input_ids) for b in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, sl] = torch.tensor(b.input_ids)
        labels[i, sl] = torch.tensor(b.labels)
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
