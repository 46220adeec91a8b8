"""Batched greedy generation equals one-at-a-time generation (left padding is invisible to the answers)."""

import torch

from seamlm.generation import generate_answers
from tests.conftest import make_model


def test_batched_equals_unbatched_and_restores_tokenizer(tokenizer):
    model = make_model(len(tokenizer), seed=2).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:5] *= 0.01  # keep the random model off the special tokens
    prompts = ["Hi", "What is the longest river in the world, roughly?", "Name a fruit."]
    one = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == one and any(batched)
    assert tokenizer.padding_side == "right" and tokenizer.truncation_side == "right"


def test_long_prompts_keep_their_end(tokenizer):
    """Truncation cuts the start of a long prompt: the generation prompt (<|assistant|>) must survive."""
    from seamlm.data.format import prompt_text

    model = make_model(len(tokenizer), seed=2).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:5] *= 0.01
    long = "x" * 600 + " final question?"
    got = generate_answers(model, tokenizer, [long], max_new_tokens=5, max_prompt_tokens=64)[0]
    ids = tokenizer(prompt_text(tokenizer, long), add_special_tokens=False)["input_ids"][-64:]
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert got == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_answers_stop_at_the_eos_training_appends_even_when_the_generation_config_names_another(tokenizer):
    from seamlm.generation import stop_token_ids

    model = make_model(len(tokenizer), seed=2).eval()
    model.generation_config.eos_token_id = [7, 9]  # e.g. an end-of-turn token that differs from tokenizer.eos
    assert stop_token_ids(model, tokenizer) == sorted({7, 9, tokenizer.eos_token_id})
    seen = {}
    real = model.generate

    def spy(**kw):
        seen.update(kw)
        return real(**kw)

    model.generate = spy
    generate_answers(model, tokenizer, ["Hi"], max_new_tokens=2)
    assert seen["eos_token_id"] == sorted({7, 9, tokenizer.eos_token_id})


def test_answers_are_plain_greedy_whatever_decoding_rules_the_model_ships(tokenizer):
    """A generation_config with a repetition penalty, banned n-grams, suppressed tokens or a minimum length (as some
    instruct models ship) must not change the answers: HS and distillation are plain greedy decoding."""
    model = make_model(len(tokenizer), seed=2).eval()
    prompts = ["Hi", "Name a fruit."]
    plain = generate_answers(model, tokenizer, prompts, max_new_tokens=8)
    cfg = model.generation_config
    cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.min_new_tokens = 3.0, 2, 8
    cfg.suppress_tokens = tokenizer(plain[0], add_special_tokens=False)["input_ids"][:1]
    with torch.no_grad():  # what generate() alone would give under those rules: other answers
        enc = tokenizer([prompts[0]], return_tensors="pt")
        ruled = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        bare = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=None,
                              suppress_tokens=None)
    assert not torch.equal(ruled, bare)  # the rules do act on this model
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=8) == plain


def test_each_answer_says_whether_the_model_ended_it(tokenizer):
    from seamlm.generation import generate_answers_ended

    model = make_model(len(tokenizer), seed=2).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:5] *= 0.01  # off the special tokens: the budget ends these answers
    (text, ended), = generate_answers_ended(model, tokenizer, ["Hi"], max_new_tokens=4)
    assert text and not ended
    from seamlm.data.format import encode_prompts

    enc = encode_prompts(tokenizer, ["Hi"], "chat", 512, "cpu")
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    first = int(out[0, enc["input_ids"].shape[1]])
    model.generation_config.eos_token_id = [first]  # now the model's first token is an end token
    (short, ended), = generate_answers_ended(model, tokenizer, ["Hi"], max_new_tokens=4)
    assert ended and short != text
