"""Built-in zero-shot scoring against a hand computation of lm-eval's rule."""

import math

import pytest
import torch

from seamlm.errors import ConfigError, DataError
from seamlm.evaluate.zeroshot import MCItem, choice_loglikelihoods, score_items, task_items
from tests.conftest import make_model


def _hand_loglikelihood(model, tokenizer, context, continuation):
    """lm-eval's loglikelihood: encode context+continuation as one string, the continuation is what follows the
    context's encoding; one forward, sum of log p of the continuation tokens."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation  # trailing spaces belong to the continuation
    c = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    t = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"][len(c):]
    with torch.no_grad():
        logits = model(torch.tensor([c + t])).logits[0].double().log_softmax(-1)
    return sum(logits[len(c) - 1 + i, tok].item() for i, tok in enumerate(t))


ITEMS = [
    MCItem(("Question: What colour is the sky?\nAnswer:",), ("blue", "a kind of green"), 0),
    MCItem(("A context that ends in a space ",), ("x", "yz"), 0),  # the space moves to the continuation
    MCItem(("The cat sat on the",), ("mat", "very long sofa cushion"), 1),
    MCItem(("Ann helped Bea because Ann", "Ann helped Bea because Bea"), ("was kind.", "was kind."), 0),  # winogrande form
]


def _tokenizer(kind, fixture):
    from tests.test_format import _trained_tokenizer

    return fixture if kind == "bytes" else _trained_tokenizer(sentencepiece=kind == "sentencepiece")


@pytest.mark.parametrize("kind", ["bytes", "byte_level_bpe", "sentencepiece"])
def test_loglikelihoods_match_the_hand_computation(tokenizer, kind):
    tokenizer = _tokenizer(kind, tokenizer)
    model = make_model(len(tokenizer)).eval()
    got = choice_loglikelihoods(model, tokenizer, ITEMS, batch_size=2)
    for it, lls in zip(ITEMS, got, strict=True):
        for i, ll in enumerate(lls):
            assert ll == pytest.approx(_hand_loglikelihood(model, tokenizer, it.context(i), " " + it.choices[i]), abs=1e-4)
    if kind == "sentencepiece":  # here encoding the continuation alone would give other tokens: the rule matters
        enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        ctx, cont = ITEMS[0].context(0), " " + ITEMS[0].choices[0]
        assert enc(ctx + cont)[len(enc(ctx)):] != enc(cont)


def test_acc_and_acc_norm_follow_lm_eval():
    # gold is the long choice: its total log p is lower (acc misses it) but per character higher (acc_norm hits)
    items = [MCItem(("q",), ("ab", "abcdefghij"), 1)]
    def scores(lls):
        out = score_items(items * len(lls), lls)
        return out["acc"], out["acc_norm"], out["n"]

    assert scores([[-2.0, -3.0]]) == (0.0, 1.0, 1)  # -1.0/char vs -0.3/char
    assert scores([[-2.0, -30.0]]) == (0.0, 0.0, 1)  # -1.0 vs -3.0
    assert scores([[-5.0, -3.0]]) == (1.0, 1.0, 1)
    # the standard error of acc: sample sd (n − 1) over √n, as lm-eval; undefined for one item
    assert math.isnan(score_items(items, [[-5.0, -3.0]])["acc_stderr"])
    three = score_items(items * 3, [[-5.0, -3.0], [-2.0, -3.0], [-2.0, -3.0]])  # acc 1/3
    assert three["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))
    # a model with NaN weights scores no accuracy (argmax over NaN would pick choice 0 and call it right)
    nan = score_items(items * 2, [[-5.0, -3.0], [float("nan"), float("nan")]])
    assert math.isnan(nan["acc"]) and math.isnan(nan["acc_norm"])


def test_task_items_are_seeded_and_well_formed():
    a, b = task_items("arc_easy", 10, seed=1), task_items("arc_easy", 10, seed=1)
    assert a == b and len(a) == 10 and all(0 <= it.gold < len(it.choices) for it in a)
    assert task_items("arc_easy", 10, seed=2) != a  # another seed, another subsample
    wg = task_items("winogrande", 5, seed=0)
    assert all(len(it.contexts) == 2 and it.choices[0] == it.choices[1] for it in wg)
    assert task_items("boolq", 3)[0].choices == ("no", "yes")
    mmlu = task_items("mmlu", 1)[0]
    assert mmlu.context(0).startswith("The following are multiple choice questions (with answers) about ")
    with pytest.raises(DataError, match="unknown zero-shot task"):
        task_items("nope", 1)


_LM_EVAL_TASK = """task: seamlm_fixture_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_lm_eval_task(folder, n: int, seed: int = 3):
    """An lm-eval task YAML ``seamlm_fixture_arc`` over ``n`` offline ARC-Easy items (local JSONL) in
    ``folder/tasks``; returns that folder."""
    import json

    items = task_items("arc_easy", n, seed=seed)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"context": it.context(0), "choices": list(it.choices), "gold": it.gold}) + "\n"
                            for it in items))
    (folder / "tasks").mkdir(exist_ok=True)
    (folder / "tasks" / "fixture.yaml").write_text(_LM_EVAL_TASK.format(data=data))
    return folder / "tasks"


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_built_in_scorer_agrees_with_lm_eval_itself(tokenizer, tmp_path, monkeypatch, kind):
    """The lm-eval adapter on a local task (offline: dataset_path json) and the built-in evaluator on the same
    ARC-Easy items give the same acc and acc_norm (also with a tokenizer whose continuation tokens depend on the
    context, where only lm-eval's split rule agrees)."""
    pytest.importorskip("lm_eval")
    tokenizer = _tokenizer(kind, tokenizer)
    from seamlm.evaluate.zeroshot import run_lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tasks = write_lm_eval_task(tmp_path, n=40)
    items = task_items("arc_easy", 40, seed=3)
    model = make_model(len(tokenizer), seed=4).eval()
    ours = score_items(items, choice_loglikelihoods(model, tokenizer, items, batch_size=4))
    theirs = run_lm_eval(model, tokenizer, ["seamlm_fixture_arc"], batch_size=4, include_path=tasks)
    got = theirs["seamlm_fixture_arc"]
    assert got["acc,none"] == pytest.approx(ours["acc"]) and got["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert got["acc_stderr,none"] == pytest.approx(ours["acc_stderr"]) and 0 < ours["acc_stderr"] < 0.1
    assert ours["acc"] != ours["acc_norm"]  # the two rules disagree on these items, so both were compared


def test_lm_eval_adapter_names_unknown_tasks(tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from seamlm.evaluate.zeroshot import run_lm_eval

    with pytest.raises(DataError, match="does not know the task"):
        run_lm_eval(make_model(len(tokenizer)), tokenizer, ["no_such_task_xyz"], include_path=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        run_lm_eval(make_model(len(tokenizer)), tokenizer, ["x"], include_path=tmp_path / "missing")
    tasks = write_lm_eval_task(tmp_path, n=2)
    yaml = tasks / "fixture.yaml"
    yaml.write_text("tag: seamlm_fixture_tag\n" + yaml.read_text())
    with pytest.raises(DataError, match="seamlm_fixture_tag: lm-eval tag"):
        run_lm_eval(make_model(len(tokenizer)), tokenizer, ["seamlm_fixture_tag"], include_path=tasks)


def test_lm_eval_hub_task_offline_says_what_to_do(tokenizer, monkeypatch, tmp_path):
    """lm-eval's own arc_easy reads allenai/ai2_arc from the Hub: offline, a DataError names the local way."""
    pytest.importorskip("lm_eval")
    import datasets.config

    from seamlm.evaluate.zeroshot import run_lm_eval

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # not a copy a user's cache may hold
    with pytest.raises(DataError, match=r"could not load the data of arc_easy.*include_path"):
        run_lm_eval(make_model(len(tokenizer)), tokenizer, ["arc_easy"], limit=2)


def test_contexts_longer_than_the_model_are_cut_from_the_left_as_lm_eval_does(tokenizer, caplog):
    model = make_model(len(tokenizer)).eval()
    model.config.max_position_embeddings = 24
    long = MCItem(("word " * 40 + "The cat sat on the",), ("mat", "sofa"), 0)
    encoded = [(list(range(3, 43)), [50, 51]), (list(range(3, 43)), [52])]
    got = choice_loglikelihoods(model, tokenizer, [long], encoded=encoded)[0]
    # lm-eval feeds (context + continuation)[-(24 + 1):][:-1]: the last 25 − |choice| context tokens
    cut = [(list(range(20, 43)), [50, 51]), (list(range(19, 43)), [52])]
    assert got == pytest.approx(choice_loglikelihoods(model, tokenizer, [long], encoded=cut)[0], abs=1e-5)
    assert "2 of 2 choices exceed the model's 24 positions" in caplog.text
    # ... scored by hand: one forward of those 24 fed tokens, the choice's log-probabilities read off its logits
    seq = torch.tensor([list(range(20, 43)) + [50]])
    logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    assert got[0] == pytest.approx((logp[-2, 50] + logp[-1, 51]).item(), abs=1e-4)
    with pytest.raises(ConfigError, match="a choice alone has 30 tokens, the model takes 24"):
        choice_loglikelihoods(model, tokenizer, [long], encoded=[([3], list(range(3, 33))), ([3], [4])])
    # a choice of exactly the model's positions still fits (one context token predicts its first)
    assert len(choice_loglikelihoods(model, tokenizer, [long], encoded=[([3], list(range(3, 27))), ([3], [4])])[0]) == 2


def test_the_mean_over_tasks_carries_the_standard_error_of_a_mean_of_independent_tasks(tokenizer):
    from seamlm.evaluate.zeroshot import evaluate_zero_shot

    got = evaluate_zero_shot(make_model(len(tokenizer)).eval(), tokenizer, ("arc_easy", "sciq"), limit=6, batch_size=6)
    a, b = got["arc_easy"]["acc_stderr"], got["sciq"]["acc_stderr"]
    assert got["mean"]["acc_stderr"] == pytest.approx(math.sqrt(a * a + b * b) / 2)


def _score_each_as_its_own_row(model, tokenizer, items, batch_size, encoded) -> list[int]:
    """Asserts that every choice scores as its own one-row forward would; returns the tokens fed per forward pass
    (the mask's columns of the new input, not of the cache)."""
    fed: list[int] = []

    def count(module, args, kwargs, out):
        fed.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum()))

    hook = model.get_decoder().register_forward_hook(count, with_kwargs=True)
    got = [v for lls in choice_loglikelihoods(model, tokenizer, items, batch_size, encoded=encoded) for v in lls]
    hook.remove()
    for (ctx, cont), ll in zip(encoded, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
        assert ll == pytest.approx(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)), abs=1e-4)
    return fed


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_the_choices_of_one_context_share_its_forward_pass(tokenizer, attn, batch_size):
    """Contexts of different lengths (padded together), choices of 1 to 6 tokens, a per-choice context
    (winogrande form): every choice scores as its own one-row forward would, and the model is fed each shared
    context once — the first choice with it, the others only their own tokens."""
    model = make_model(len(tokenizer), seed=2).eval()
    model.set_attn_implementation(attn)
    items = [MCItem(("a",), ("b", "c", "d", "e"), 0), MCItem(("f",), ("g", "h"), 0), MCItem(("i", "j"), ("k", "k"), 0)]
    encoded = [(list(range(3, 40)), [50, 51, 52]), (list(range(3, 40)), [53]), (list(range(3, 40)), [54, 55, 56, 57, 58, 59]),
               (list(range(3, 40)), [60, 61]),
               ([7, 8, 9], [70]), ([7, 8, 9], [71, 72, 73, 74]),
               ([5, 6, 7, 8, 9, 10], [80, 81]), ([5, 6, 7, 11], [80, 81])]
    fed = _score_each_as_its_own_row(model, tokenizer, items, batch_size, encoded)
    one_row_each = sum(len(c) + len(t) - 1 for c, t in encoded)
    shared = (37 + 3 - 1) + 0 + 5 + 1 + (3 + 1 - 1) + 3 + (6 + 2 - 1) + (4 + 2 - 1)
    assert sum(fed) == shared < one_row_each / 2


@pytest.mark.parametrize("window", [16, 64])
def test_a_sliding_window_model_scores_as_one_row_per_choice(window):
    """A sliding-window cache evicts keys once a row outgrows the window, which would leave a shared row's padding
    and first choice in place of the context's end: rows longer than the window (16) are scored one per choice;
    rows that fit (64) share the context, both as their own one-row forward would score them."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                             pad_token_id=0)).eval()
    items = [MCItem(("a",), ("b", "c", "d"), 0), MCItem(("e",), ("f", "g"), 0)]
    encoded = [(list(range(3, 40)), [50, 51, 52]), (list(range(3, 40)), [53]), (list(range(3, 40)), [54, 55]),
               ([7, 8, 9], [70]), ([7, 8, 9], [71, 72, 73, 74])]
    fed = _score_each_as_its_own_row(model, type("Tok", (), {"pad_token_id": 0})(), items, 16, encoded)
    one_row_each = sum(len(c) + len(t) - 1 for c, t in encoded)
    assert (sum(fed) == one_row_each) == (window == 16)
