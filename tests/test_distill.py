"""Self-distillation: greedy answers cached on disk under the model's hash."""

import json

import torch

import seamlm.data.distill as distill
from seamlm.data.distill import distill_answers, model_fingerprint
from tests.conftest import make_model


def test_answers_are_cached_by_model_hash(tokenizer, tmp_path, monkeypatch):
    model = make_model(len(tokenizer)).eval()
    with torch.no_grad():  # a random tied-embedding model otherwise echoes the last (special) token forever
        model.model.embed_tokens.weight[:5] *= 0.01
    real = distill.generate_answers_ended

    def as_ended(*a, **k):  # this random model never ends an answer; cut answers have their own test below
        return [(t, True) for t, _ in real(*a, **k)]

    monkeypatch.setattr(distill, "generate_answers_ended", as_ended)
    prompts = ["What is 2+2?", "Name a colour.", "What is 2+2?"]
    first = distill_answers(model, tokenizer, prompts, tmp_path, max_new_tokens=6, batch_size=2)
    assert len(first) == 3 and first[0].response == first[2].response
    (cache,) = tmp_path.glob(f"{model_fingerprint(model)}-*.jsonl")  # weights digest + chat-template digest
    assert len(cache.read_text().splitlines()) == 2  # the repeated prompt is generated once

    def boom(*a, **k):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(distill, "generate_answers_ended", boom)
    again = distill_answers(model, tokenizer, prompts, tmp_path, max_new_tokens=6)
    assert [e.response for e in again] == [e.response for e in first]
    assert json.loads(cache.read_text().splitlines()[0])["max_new_tokens"] == 6
    monkeypatch.setattr(distill, "generate_answers_ended", as_ended)

    # a kill mid-write leaves half a line: that answer is generated again, on a clean line
    lines = cache.read_text().splitlines()
    cache.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    resumed = distill_answers(model, tokenizer, prompts, tmp_path, max_new_tokens=6, batch_size=2)
    assert [e.response for e in resumed] == [e.response for e in first]
    assert [json.loads(x) for x in cache.read_text().splitlines()] == [json.loads(x) for x in lines]


def test_fingerprint_changes_with_the_weights(tokenizer):
    model = make_model(len(tokenizer))
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before
    # a 0-dim buffer (some architectures keep scalars) is hashed, not an error
    model.register_buffer("scale", torch.tensor(2.0))
    assert model_fingerprint(model) != model_fingerprint(make_model(len(tokenizer)))


def test_prompts_differing_in_case_get_their_own_answers_and_another_template_misses_the_cache(tokenizer, tmp_path):
    model = make_model(len(tokenizer)).eval()
    distill_answers(model, tokenizer, ["What is 2+2?", "what is 2+2"], tmp_path, max_new_tokens=3)
    (cache,) = tmp_path.glob("*.jsonl")
    assert len(cache.read_text().splitlines()) == 2  # the split hash would have merged them
    import copy

    other = copy.deepcopy(tokenizer)  # (the fixture is shared by the session)
    other.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}"
    distill_answers(model, other, ["What is 2+2?"], tmp_path, max_new_tokens=3)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2


def test_other_end_tokens_or_prompt_budget_miss_the_cache(tokenizer, tmp_path):
    # the answers of an edited generation_config (eos_token_id) or a shorter prompt budget are other answers
    model = make_model(len(tokenizer)).eval()
    distill_answers(model, tokenizer, ["What is 2+2?"], tmp_path, max_new_tokens=3)
    distill_answers(model, tokenizer, ["What is 2+2?"], tmp_path, max_new_tokens=3, max_prompt_tokens=8)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    distill_answers(model, tokenizer, ["What is 2+2?"], tmp_path, max_new_tokens=3)
    assert len(list(tmp_path.glob("*.jsonl"))) == 3


def test_answers_cut_by_the_token_budget_end_at_their_last_sentence(tokenizer, tmp_path, monkeypatch, caplog):
    """Training appends EOS to every answer, so an answer the budget cut mid-sentence is cut back to its last full
    sentence (or dropped), and the log says how many."""
    from seamlm.data.distill import _to_last_sentence

    assert _to_last_sentence("First step. Then mix the") == "First step."
    assert _to_last_sentence("Line one\nline two goes") == "Line one"
    assert _to_last_sentence("no end at all") == ""
    # not ends: a list number, an abbreviation, a line ending in ":" (the heading of what was cut); 。 is one
    assert _to_last_sentence("Here is how:\n\n1. Buy flour and") == ""
    assert _to_last_sentence("I love it. Ask Dr. Smith or e.g. the") == "I love it."
    assert _to_last_sentence("你好。我是一个助手。我可以帮") == "你好。我是一个助手。"
    # "no." and "etc." end a sentence unless a number / a lower-case word follows
    assert _to_last_sentence("Is it safe? The short answer is no. Because the") == "Is it safe? The short answer is no."
    assert _to_last_sentence("Buy apples, pears, etc. Then wash them and") == "Buy apples, pears, etc."
    assert _to_last_sentence("Fine. See form No. 5 and the") == "Fine."
    assert _to_last_sentence("Fine. Pears, etc. and also") == "Fine."
    answers = {"a": ("Boil water. Add the", False), "b": ("Done.", True), "c": ("no sentence end", False)}
    monkeypatch.setattr(distill, "generate_answers_ended", lambda m, t, prompts, *a, **k: [answers[p] for p in prompts])
    model = make_model(len(tokenizer))
    got = distill_answers(model, tokenizer, ["a", "b", "c"], tmp_path, max_new_tokens=6)
    assert [(e.prompt, e.response) for e in got] == [("a", "Boil water."), ("b", "Done.")]
    assert "2 of 3 answers reached max_new_tokens=6" in caplog.text
    assert [json.loads(x)["ended"] for x in next(tmp_path.glob("*.jsonl")).read_text().splitlines()] == [False, True, False]


def test_the_cache_key_ignores_the_padding_and_truncation_a_last_call_left(tokenizer):
    """The fast tokenizer keeps the padding/truncation of its last call: a user who tokenised with padding first
    must not regenerate every answer into a new cache file."""
    from seamlm.data.distill import _generation_digest
    from tests.conftest import make_model

    model = make_model(len(tokenizer))
    before = _generation_digest(model, tokenizer, 512)
    tokenizer(["hello world", "x"], padding=True, truncation=True, max_length=3)
    assert _generation_digest(model, tokenizer, 512) == before
    tokenizer("plain")  # (as it was)


def test_distill_refuses_an_out_that_is_its_prompts_file(tmp_path, capsys, monkeypatch):
    """``--out`` naming the ``--prompts`` file (however spelled, or a link to it) would replace the prompts with
    their answers: refused before the model loads."""
    import seamlm.models
    from seamlm.cli import main

    monkeypatch.setattr(seamlm.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?"}\n')
    (tmp_path / "link.jsonl").symlink_to(prompts)
    monkeypatch.chdir(tmp_path)
    for out in ("prompts.jsonl", f"{tmp_path}/./prompts.jsonl", "link.jsonl"):
        assert main(["data", "distill", "--model", "m", "--prompts", str(prompts), "--out", out]) == 2, out
        err = capsys.readouterr().err
        assert f"--out {out} is the --prompts file" in err and "Traceback" not in err
    assert prompts.read_text() == '{"prompt": "What is 2+2?"}\n'


def test_distill_replaces_its_out_file_atomically(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A full disk (or a kill) while the answers are written leaves the old --out whole, and no temporary file."""
    import errno
    import os

    from seamlm.cli import main

    monkeypatch.setattr(distill, "generate_answers_ended", lambda m, t, chunk, *a, **k: [("A fine answer.", True)] * len(chunk))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?"}\n{"prompt": "Name a colour."}\n')
    out = tmp_path / "benign.jsonl"
    out.write_text("old answers\n")
    args = ["data", "distill", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out),
            "--cache-dir", str(tmp_path / "cache")]

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    with monkeypatch.context() as m:
        m.setattr(os, "replace", full_disk)
        assert main(args) == 1
    assert "the disk is full" in capsys.readouterr().err
    assert out.read_text() == "old answers\n" and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert main(args) == 0
    assert [json.loads(x)["response"] for x in out.read_text().splitlines()] == ["A fine answer."] * 2
