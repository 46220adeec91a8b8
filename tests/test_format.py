"""Formatting, answer masks from the prompt length, truncation and padding."""

import operator
import re

import pytest

from seamlm.data.files import Example
from seamlm.data.format import IGNORE_INDEX, Formatter, collate, prompt_text
from tests.conftest import make_tokenizer


def test_mask_covers_exactly_the_prompt(tokenizer):
    ex = Example("What is 2+2?", "4")
    row = Formatter(tokenizer, max_length=128)(ex)
    n_prompt = len(tokenizer(prompt_text(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"])
    assert row.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert row.labels[n_prompt:] == row.input_ids[n_prompt:]
    assert tokenizer.decode(row.input_ids[n_prompt:-1]) == "4"
    assert row.input_ids[-1] == tokenizer.eos_token_id


def test_answer_starting_like_the_refusal_is_still_masked_by_length(tokenizer):
    """The reference compared H and R token by token; identical answer prefixes must not change the mask."""
    fmt = Formatter(tokenizer, max_length=128)
    a = fmt(Example("Q?", "I can't help with that."))
    b = fmt(Example("Q?", "I can help with that."))
    assert sum(x != IGNORE_INDEX for x in a.labels) == len(tokenizer("I can't help with that.")["input_ids"]) + 1
    assert a.labels.count(IGNORE_INDEX) == b.labels.count(IGNORE_INDEX)


def test_fallback_format_without_chat_template():
    tok = make_tokenizer(chat_template=False)
    assert prompt_text(tok, "Why?") == "Question: Why?\nAnswer:"


CORPUS = ["Question: Why is the sky blue?\nAnswer: Because air scatters blue light.",
          "Question: Is it?\nAnswer: Yes, because it is.", "Answer: Because. Answer: Yes."] * 20


def _trained_tokenizer(sentencepiece: bool):
    """A BPE tokenizer with real merges: byte-level (GPT-2, SmolLM2: the space belongs to the next word's token)
    or Metaspace with a prefix on every text (SentencePiece, Llama 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    if sentencepiece:  # as Llama 2's tokenizer.json: "▁" prepended to the text and for every space
        core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
        alphabet = []
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                         special_tokens=["<pad>", "<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize(("sentencepiece", "joiner"), [(False, " "), (True, "")])
def test_the_fallback_format_encodes_the_answer_as_the_joined_text_would(sentencepiece, joiner):
    """Prompt format 2: "Answer:" and the answer meet as the tokenizer encodes "Answer: Because…" in one text — no
    lone space token before a word in its start-of-text form (format 1's "Answer: " + the answer alone)."""
    from seamlm.data.format import answer_ids, answer_joiner

    tok = _trained_tokenizer(sentencepiece)
    assert answer_joiner(tok) == joiner
    ex = Example("Why is the sky blue?", "Because air scatters blue light.")
    joined = tok(f"Question: {ex.prompt}\nAnswer: {ex.response}", add_special_tokens=False)["input_ids"]
    for template in ("plain", "chat"):  # "chat" falls back: no chat template
        row = Formatter(tok, max_length=128, template=template)(ex)
        assert row.input_ids == [*joined, tok.eos_token_id]
        n_prompt = len(tok(prompt_text(tok, ex.prompt, template), add_special_tokens=False)["input_ids"])
        assert row.labels == [IGNORE_INDEX] * n_prompt + row.input_ids[n_prompt:]  # the answer and EOS only
    if not sentencepiece:  # the test can fail: format 1's split is another encoding here
        old = tok("Question: Why is the sky blue?\nAnswer: ", add_special_tokens=False)["input_ids"] + \
            tok(ex.response, add_special_tokens=False)["input_ids"]
        assert old != joined and "ĠBecause" in tok.convert_ids_to_tokens(joined)
    # a chat template ends its generation prompt itself (newline or special token): the answer follows as it is
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\n{% endif %}"
    assert answer_ids(tok, "Yes", "chat") == tok("Yes", add_special_tokens=False)["input_ids"]
    assert answer_ids(tok, "Yes", "plain") == tok(joiner + "Yes", add_special_tokens=False)["input_ids"]
    # leading whitespace (an API caller's unstripped answer) and an empty answer bring no lone space token
    assert answer_ids(tok, " \nYes", "plain") == answer_ids(tok, "Yes", "plain")
    assert answer_ids(tok, "", "plain") == []


def test_truncation_keeps_part_of_the_answer(tokenizer, caplog):
    fmt = Formatter(tokenizer, max_length=40, min_answer_tokens=8)
    rows = fmt.encode_all([Example("x" * 100, "y" * 100)], "t")
    row = rows[0]
    assert len(row.input_ids) == 40
    assert sum(lbl != IGNORE_INDEX for lbl in row.labels) >= 8
    assert fmt.truncated == 1
    assert "truncated" in caplog.text


def test_no_answer_mask_option(tokenizer):
    row = Formatter(tokenizer, max_length=128, mask_prompt=False)(Example("Q?", "A."))
    assert IGNORE_INDEX not in row.labels


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding(tokenizer, side):
    fmt = Formatter(tokenizer, max_length=128)
    rows = [fmt(Example("Q?", "short")), fmt(Example("A longer question?", "a longer answer"))]
    out = collate(rows, tokenizer.pad_token_id, padding_side=side)
    short = len(rows[0].input_ids)
    width = out["input_ids"].shape[1]
    mask = out["attention_mask"][0].tolist()
    assert sum(mask) == short
    if side == "right":
        assert mask[:short] == [1] * short and out["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
    else:
        assert mask[width - short:] == [1] * short and out["labels"][0, : width - short].eq(IGNORE_INDEX).all()
    assert (out["labels"][out["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_warns_when_the_answer_cannot_keep_its_minimum(tokenizer, caplog):
    fmt = Formatter(tokenizer, max_length=16, min_answer_tokens=20)
    row = fmt.encode_all([Example("a question", "y" * 100)], "tiny")[0]
    assert len(row.input_ids) == 16 and row.labels[0] == IGNORE_INDEX  # still one prompt token, rest answer
    assert fmt.answer_lost == 1 and "fewer than 20 answer tokens" in caplog.text


def _bos_tokenizer(add_bos: bool, template_writes_bos: bool):
    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.add_bos_token = add_bos  # as Llama/Gemma tokenizers set it
    if template_writes_bos:  # like the Llama-2/3 chat templates
        tok.chat_template = "{{ bos_token }}" + tok.chat_template
    return tok


@pytest.mark.parametrize("template_writes_bos", [False, True])
@pytest.mark.parametrize("template", ["chat", "plain", "alpaca"])
def test_a_bos_tokenizer_gets_exactly_one_bos_in_training_generation_and_scoring(template, template_writes_bos):
    """Training rows, generation prompts and zero-shot/FS contexts all start with one BOS where the tokenizer adds
    one to text, whether the prompt text brought its own (a chat template writing {{ bos_token }}) or not."""
    from seamlm.data.format import encode_prompts
    from seamlm.evaluate.zeroshot import _encode_pair

    tok = _bos_tokenizer(True, template_writes_bos)
    bos = tok.bos_token_id
    row = Formatter(tok, max_length=512, template=template)(Example("Q?", "A."))
    batch = encode_prompts(tok, ["Q?", "A much longer question?"], template)
    first_real = [ids[mask.bool()][:2].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    ctx, _ = _encode_pair(tok, prompt_text(tok, "Q?", template), "positive")
    # and a prompt cut from the left (training, generation) keeps its BOS
    long = "x" * 60 + "?"
    cut = Formatter(tok, max_length=24, template=template)(Example(long, "A."))
    cut_prompt = encode_prompts(tok, [long], template, max_tokens=12)["input_ids"][0].tolist()
    for start in (row.input_ids[:2], *first_real, ctx[:2], cut.input_ids[:2], cut_prompt[:2]):
        assert start[0] == bos and start[1] != bos
    assert row.labels[0] == IGNORE_INDEX  # the BOS belongs to the masked prompt
    assert len(cut.input_ids) == 24 and len(cut_prompt) == 12
    assert cut_prompt[1:] == encode_prompts(tok, [long], template)["input_ids"][0].tolist()[-11:]


def test_no_bos_where_the_tokenizer_adds_none(tokenizer):
    from seamlm.data.format import encode_prompts
    from seamlm.evaluate.zeroshot import _encode_pair

    tok = _bos_tokenizer(False, False)
    row = Formatter(tok, max_length=128)(Example("Q?", "A."))
    batch = encode_prompts(tok, ["Q?"])
    ctx, _ = _encode_pair(tok, "Question: Q?", " yes")
    assert tok.bos_token_id not in row.input_ids + batch["input_ids"][0].tolist() + ctx
    # and nothing changes for a tokenizer that has no BOS at all (SmolLM2's): the ids are the plain encoding
    assert Formatter(tokenizer, 128)(Example("Q?", "A.")).input_ids[:3] == tokenizer(prompt_text(tokenizer, "Q?"))["input_ids"][:3]


def test_the_truncation_warning_counts_answers_cut_at_their_end(tokenizer, caplog):
    fmt = Formatter(tokenizer, max_length=40, min_answer_tokens=8)
    fmt.encode_all([Example("x" * 100, "y"), Example("q", "y" * 100)], "t")
    assert (fmt.truncated, fmt.answer_cut, fmt.answer_lost) == (2, 1, 0)
    assert "2 of 2 examples exceeded" in caplog.text and "the answer's end cut in 1 of them" in caplog.text


def _answer_len(row) -> int:
    return sum(lbl != IGNORE_INDEX for lbl in row.labels)


def test_truncate_first_prompt_trains_a_short_answer_to_a_long_prompt_whole(tokenizer):
    """The default keeps a long prompt whole and cuts the refusal to 8 tokens; ``truncate_first="prompt"`` cuts
    the prompt's start instead, down to half the budget, and only then the answer's end."""
    long_prompt, refusal = "x" * 100, "I can't help with that."
    whole = len(tokenizer(refusal, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    by_default = Formatter(tokenizer, max_length=64)(Example(long_prompt, refusal))
    assert _answer_len(by_default) == 8 and by_default.input_ids[-1] != tokenizer.eos_token_id
    fmt = Formatter(tokenizer, max_length=64, truncate_first="prompt")
    row = fmt(Example(long_prompt, refusal))
    assert len(row.input_ids) == 64 and _answer_len(row) == whole and row.input_ids[-1] == tokenizer.eos_token_id
    full_prompt = Formatter(tokenizer, max_length=1000)(Example(long_prompt, refusal)).input_ids[:-whole]
    assert row.input_ids[:64 - whole] == full_prompt[-(64 - whole):]  # the prompt lost its start, kept its end
    # both long: the prompt keeps half the budget, the answer the other half
    both = fmt(Example(long_prompt, "y" * 100))
    assert len(both.input_ids) == 64 and _answer_len(both) == 32
    # a short prompt is never cut: the answer takes the rest
    short = fmt(Example("q", "y" * 100))
    assert len(short.input_ids) == 64 and short.labels.count(IGNORE_INDEX) == len(
        Formatter(tokenizer, max_length=1000)(Example("q", "y")).input_ids) - 2
    assert (fmt.truncated, fmt.answer_cut) == (3, 2)


def test_truncate_first_must_be_known(tokenizer):
    from seamlm.errors import ConfigError

    with pytest.raises(ConfigError, match="truncate_first must be one of answer, prompt"):
        Formatter(tokenizer, truncate_first="middle")


def test_bos_is_detected_from_what_the_tokenizer_does_not_only_its_flag():
    """Llama-3-style files add BOS in the tokenizer.json post-processor while add_bos_token reads False: the
    prompt still gets its one BOS."""
    from tokenizers import processors

    from seamlm.data.format import adds_bos, encode_text

    tok = _bos_tokenizer(False, False)
    bos = tok.bos_token_id
    assert not adds_bos(tok)
    tok = _bos_tokenizer(False, False)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)])
    assert not tok.add_bos_token and tok("hi")["input_ids"][0] == bos
    assert adds_bos(tok)
    ids = encode_text(tok, prompt_text(tok, "Q?", "plain"))
    assert ids[0] == bos and ids[1] != bos


def test_a_token_only_named_bos_is_cut_like_any_other():
    """SmolLM2 names <|im_start|> its BOS: every chat turn starts with it but the tokenizer never adds it. A prompt
    cut from the left keeps no such token in front (which would change every long prompt's encoding)."""
    from seamlm.data.format import encode_prompts

    tok = _bos_tokenizer(False, True)  # the template writes the BOS token, the tokenizer does not add it
    long = "x" * 60 + "?"
    full = encode_prompts(tok, [long])["input_ids"][0].tolist()
    assert full[0] == tok.bos_token_id
    assert encode_prompts(tok, [long], max_tokens=12)["input_ids"][0].tolist() == full[-12:]
    cut = Formatter(tok, max_length=24)(Example(long, "A."))
    assert cut.input_ids[0] != tok.bos_token_id and len(cut.input_ids) == 24


def test_a_template_that_writes_todays_date_is_given_one_fixed_date():
    """Llama 3's templates write "Today Date: <strftime_now>": the same prompt must be the same text on every day
    (training, a resume, generation, scoring and the distillation cache)."""
    from seamlm.data.format import TEMPLATE_DATE

    tok = make_tokenizer()
    tok.chat_template = ('{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = '
                         'strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "01 Jan 2000" %}{%- endif %}'
                         '{%- endif %}Today Date: {{ date_string }}\n{% for m in messages %}{{ m["content"] }}'
                         '{% endfor %}\nAnswer:')
    assert prompt_text(tok, "Hi").startswith(f"Today Date: {TEMPLATE_DATE}\nHi")


def _str_plus_int_error() -> str:
    """Python's own message for the template expression ``'text' + 1``."""
    with pytest.raises(TypeError) as info:
        operator.add("text", 1)
    return str(info.value)


BROKEN_TEMPLATES = [
    ("{{ x }", r"syntax error at line 1: unexpected '\}'"),
    ("{{ raise_exception('system messages are not supported') }}", "it fails with: system messages are not supported"),
    ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",
     f"it fails with: TypeError: {re.escape(_str_plus_int_error())}"),
    ("{{ 1 / 0 }}", "it fails with: ZeroDivisionError: division by zero"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "it fails with: RecursionError: maximum recursion depth[^)]*"),
]


@pytest.mark.parametrize("template,complaint", BROKEN_TEMPLATES)
def test_a_chat_template_that_cannot_format_a_prompt_is_a_clear_error(template, complaint):
    from seamlm.data.format import check_chat_template
    from seamlm.errors import ModelLoadError

    tok = make_tokenizer()
    tok.chat_template = template
    with pytest.raises(ModelLoadError, match=f"chat template of model 'my-model' cannot format a prompt \\({complaint}"
                                             r"\)\. Fix the template .* plain fallback format"):
        check_chat_template(tok, "my-model")
    # a tokenizer that never went through the check (the Python API) fails as clearly at its first prompt
    with pytest.raises(ModelLoadError, match=complaint):
        Formatter(tok)(Example("Q?", "A."))
    assert check_chat_template(make_tokenizer(), "ok") and not check_chat_template(make_tokenizer(False), "none")
