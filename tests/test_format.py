"""Formatting, answer masks from the prompt length, truncation and padding."""

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
    assert prompt_text(tok, "Why?") == "Question: Why?\nAnswer: "


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
