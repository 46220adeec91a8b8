"""The shared fine-tuning loop: full, LoRA (merged), SGD, divergence."""

import json
import math

import pytest
import torch

from seamlm.errors import ConfigError, NonFiniteLossError
from seamlm.finetune import FinetuneConfig, finetune
from tests.conftest import BENIGN, HARMFUL, make_model


def test_full_finetune_lowers_the_loss_and_logs_every_step(tokenizer, tmp_path):
    model = make_model(len(tokenizer))
    res = finetune(model, tokenizer, HARMFUL, FinetuneConfig(lr=2e-3, epochs=4, batch_size=4), tmp_path / "l.jsonl")
    assert res.steps == 12 and len(res.losses) == 12
    assert sum(res.losses[-3:]) / 3 < 0.9 * sum(res.losses[:3]) / 3
    rows = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13)) and rows[0]["loss"] == res.losses[0]


def test_lora_trains_adapters_then_merges_them(tokenizer):
    model = make_model(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(lr=1e-2, epochs=2, batch_size=4, lora=True, lora_r=4, lora_target_modules=("q_proj", "v_proj"))
    merged = finetune(model, tokenizer, HARMFUL, cfg).model
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_spares_norm_weights_as_the_hf_trainer_does(tokenizer, optimizer):
    """With the gradients zeroed, one step is the decay alone: every weight matrix (and the embedding) shrinks by
    exactly lr·wd, no RMSNorm weight moves — the HF Trainer's grouping, which the paper's attack ran with."""
    from seamlm.finetune import TrainingHooks

    def no_grad(model, params, step):
        for p in params:
            p.grad.zero_()
        return {}

    model = make_model(len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = FinetuneConfig(lr=0.1, weight_decay=0.5, optimizer=optimizer, max_steps=1, batch_size=2,
                         lr_scheduler="constant", warmup_ratio=0.0)
    tuned = finetune(model, tokenizer, HARMFUL, cfg, hooks=TrainingHooks(transform_gradients=no_grad)).model
    norms = [n for n, _ in tuned.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(dict(tuned.named_parameters())[n], before[n]) for n in norms)
    for n, p in tuned.named_parameters():
        if n not in norms:
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sgd_steps_along_the_gradient_and_adamw_does_not(tokenizer, optimizer):
    """SGD (momentum 0, no decay): θ ← θ − lr·g exactly; AdamW's first step is ≈ lr·sign(g) instead, so a config
    whose optimizer were ignored fails one of the two."""
    from seamlm.finetune import TrainingHooks

    grads: dict[int, torch.Tensor] = {}

    def record(model, params, step):
        grads.update({id(p): p.grad.detach().clone() for p in params})
        return {}

    model = make_model(len(tokenizer))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    cfg = FinetuneConfig(lr=1e-2, optimizer=optimizer, weight_decay=0.0, max_steps=1, batch_size=2,
                         lr_scheduler="constant", warmup_ratio=0.0)
    res = finetune(model, tokenizer, HARMFUL, cfg, hooks=TrainingHooks(transform_gradients=record))
    assert res.steps == 1 and grads
    sgd_like = [torch.allclose(p.detach(), before[id(p)] - 1e-2 * grads[id(p)], rtol=0, atol=1e-7)
                for p in res.model.parameters() if id(p) in grads and grads[id(p)].abs().max() > 1e-3]
    assert sgd_like and all(sgd_like) == (optimizer == "sgd") and any(sgd_like) == (optimizer == "sgd")


def test_max_steps_stops_the_run(tokenizer):
    res = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL,
                   FinetuneConfig(lr=1e-2, optimizer="sgd", max_steps=2, batch_size=2))
    assert res.steps == 2 and len(res.losses) == 2


def test_divergence_raises_with_the_model_attached(tokenizer):
    model = make_model(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 1") as info:
        finetune(model, tokenizer, HARMFUL, FinetuneConfig(lr=1e-3))
    assert info.value.model is model and info.value.losses == []


def test_bad_lora_targets_and_values(tokenizer):
    with pytest.raises(ConfigError, match="not modules of this model"):
        finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, FinetuneConfig(lora=True, lora_target_modules=("c_attn",)))
    with pytest.raises(ConfigError, match="lr must be > 0"):
        FinetuneConfig.from_dict({"lr": 0})
    for bad, why in (({"lora_alpha": 0}, "lora_alpha must be > 0"), ({"lora_dropout": 1.5}, "lora_dropout must be in"),
                     ({"weight_decay": -0.01}, "weight_decay must be >= 0")):
        with pytest.raises(ConfigError, match=why):
            FinetuneConfig.from_dict(bad)
    # LoRA settings without LoRA would train all weights under another cell key: refused, not ignored
    with pytest.raises(ConfigError, match=r"lora_r, lora_layers set but lora is off .* add --lora true"):
        FinetuneConfig.from_dict({"lora_r": 64, "lora_layers": "0"})
    FinetuneConfig.from_dict({"lora": "true", "lora_r": 64, "lora_layers": "0"})
    # a layer beyond the model's two is an error, also beside a valid one (peft would drop it silently)
    with pytest.raises(ConfigError, match=r"lora_layers \[5\] are beyond this model's 2 decoder layers"):
        finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, FinetuneConfig(lora=True, lora_layers=(1, 5)))


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_embedding_is_refused_and_allowed_once_untied(tokenizer, target):
    """An adapter trains one use of a shared matrix, but its merge changes both uses: refused on a tied model."""
    model = make_model(len(tokenizer))
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    with pytest.raises(ConfigError, match=f"lora_target_modules \\['{target}'\\]: this model ties"):
        finetune(model, tokenizer, HARMFUL, FinetuneConfig(lora=True, lora_target_modules=(target,), max_steps=1))
    untied = make_model(len(tokenizer))
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    res = finetune(untied, tokenizer, HARMFUL, FinetuneConfig(lora=True, lora_target_modules=(target,), max_steps=1))
    assert res.losses


def test_a_non_finite_gradient_stops_before_the_update(tokenizer):
    """A finite loss with an inf/NaN gradient (here injected at step 2) must not reach the weights: the error
    carries the model as it was after step 1."""
    from seamlm.finetune import TrainingHooks

    snapshot = {}

    def poison(model, params, step):
        if step == 2:
            snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
            params[0].grad[0, 0] = float("nan")
        return {}

    model = make_model(len(tokenizer))
    with pytest.raises(NonFiniteLossError, match="gradient norm became nan at step 2") as info:
        finetune(model, tokenizer, HARMFUL, FinetuneConfig(lr=1e-3, batch_size=2),
                 hooks=TrainingHooks(transform_gradients=poison))
    assert len(info.value.losses) == 1
    assert all(torch.equal(p, snapshot[n]) for n, p in info.value.model.named_parameters())
    # the failed step's NaN gradients are gone: a later finetune of the returned model starts clean
    assert all(p.grad is None for p in info.value.model.parameters())


def test_a_gradient_left_on_the_model_does_not_join_the_first_update(tokenizer):
    cfg = FinetuneConfig(lr=1e-2, optimizer="sgd", weight_decay=0.0, max_steps=1, batch_size=2,
                         lr_scheduler="constant", warmup_ratio=0.0)
    clean = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, cfg).model
    dirty = make_model(len(tokenizer))
    for p in dirty.parameters():
        p.grad = torch.full_like(p, 5.0)
    dirty = finetune(dirty, tokenizer, HARMFUL, cfg).model
    assert all(torch.equal(a, b) for a, b in zip(clean.parameters(), dirty.parameters(), strict=True))


def test_logged_lr_is_the_rate_each_step_used_and_constant_refuses_warmup(tokenizer):
    res = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL,
                   FinetuneConfig(lr=1e-3, batch_size=4, lr_scheduler="linear", warmup_ratio=0.0))
    lrs = [r["lr"] for r in res.logs]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] > 0 and lrs == sorted(lrs, reverse=True)
    with pytest.raises(ConfigError, match="constant has no warm-up"):
        FinetuneConfig(lr_scheduler="constant", warmup_ratio=0.1)


def test_fs_trains_every_weight_of_a_model_an_attack_left_frozen(tokenizer, monkeypatch):
    """A LoRA attack's merged model comes back with its weights frozen; FS must still fine-tune all of them."""
    import seamlm.evaluate.metrics as metrics
    from seamlm.evaluate.metrics import EvalConfig, benign_finetune_accuracy

    real, seen = metrics.finetune, []

    def spy(model, *a, **k):
        seen.append([p.requires_grad for p in model.parameters()])
        return real(model, *a, **k)

    monkeypatch.setattr(metrics, "finetune", spy)
    model = make_model(len(tokenizer)).requires_grad_(False)
    out = benign_finetune_accuracy(model, tokenizer, EvalConfig(fs=True, fs_train=8, fs_test=4, fs_steps=1))
    assert len(seen) == 1 and len(seen[0]) == len(list(model.parameters())) and all(seen[0])
    assert 0 <= out["fs_accuracy"] <= 100 and out["fs_test"] == 4
    assert not any(p.requires_grad for p in model.parameters())  # the evaluated model itself is untouched


def test_fs_of_a_model_with_nan_weights_is_nan_not_a_crash(tokenizer, caplog):
    """A diverged attack's model is evaluated as it stands: its FS fine-tuning hits a NaN loss at once, which must
    give fs_accuracy nan (the cell keeps its other figures) rather than stop the grid."""
    from seamlm.evaluate.metrics import EvalConfig, benign_finetune_accuracy
    from seamlm.results import ResultRow

    model = make_model(len(tokenizer))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    out = benign_finetune_accuracy(model, tokenizer, EvalConfig(fs=True, fs_train=8, fs_test=4, fs_steps=2))
    assert math.isnan(out["fs_accuracy"]) and "FS accuracy is nan" in caplog.text
    ResultRow(model="m", defense="none", cell="pre", metric="fs_accuracy", value=out["fs_accuracy"]).validate()


def test_fs_scores_the_tokens_it_trained_on(tokenizer, monkeypatch):
    """FS scores each SST-2 answer as the Formatter encoded it for training (prompt ids, then the answer word
    tokenised alone) — not lm-eval's split of the joined text, which differs for SentencePiece tokenizers."""
    import seamlm.evaluate.metrics as metrics
    from seamlm.data.files import Example
    from seamlm.data.format import Formatter

    seen = {}
    real = metrics.choice_loglikelihoods

    def spy(model, tok, items, batch_size, desc, encoded):
        seen["items"], seen["encoded"] = items, encoded
        return real(model, tok, items, batch_size, desc=desc, encoded=encoded)

    monkeypatch.setattr(metrics, "choice_loglikelihoods", spy)
    model = make_model(len(tokenizer))
    metrics.benign_finetune_accuracy(model, tokenizer, metrics.EvalConfig(fs=True, fs_train=8, fs_test=4, fs_steps=1))
    _, test = metrics.sst2_split(8, 4, 0)
    fmt = Formatter(tokenizer, max_length=512)
    pairs = iter(seen["encoded"])
    for row, item in zip(test, seen["items"], strict=True):
        for answer in item.choices:
            ctx_ids, cont_ids = next(pairs)
            trained = fmt(Example(metrics.SST2_QUESTION.format(sentence=row["sentence"].strip()), answer)).input_ids
            assert ctx_ids + cont_ids + [tokenizer.eos_token_id] == trained
    assert len(seen["encoded"]) == 2 * len(seen["items"])


def test_sharded_finetuning_refuses_lora_and_parameter_selection(tokenizer):
    """FSDP shards full fine-tuning only: LoRA or a recipe's parameter selection under --shard_parameters is a clear
    error before any collective (so no process group is needed to see it)."""
    from seamlm.distributed import DistContext
    from seamlm.finetune import TrainingHooks

    two = DistContext(rank=0, world_size=2)
    model = make_model(len(tokenizer))
    with pytest.raises(ConfigError, match="LoRA and recipes that train chosen parameters"):
        finetune(model, tokenizer, HARMFUL, FinetuneConfig(shard_parameters=True, lora=True), ctx=two)
    with pytest.raises(ConfigError, match="drop --shard_parameters"):
        finetune(model, tokenizer, HARMFUL, FinetuneConfig(shard_parameters=True), ctx=two,
                 hooks=TrainingHooks(select_parameters=lambda m: None))


def test_a_probe_measures_the_model_along_the_run_without_changing_it(tokenizer, tmp_path):
    """Probes after 0, 2, 4 updates and after the last (5), each of the model as it is at that point; the trained
    model and the losses are the same as without the probe."""
    from seamlm.evaluate.metrics import benign_perplexity
    from seamlm.finetune import Probe, probing

    cfg = FinetuneConfig(lr=5e-3, batch_size=2, max_steps=5, epochs=2)
    plain = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, cfg)
    model = make_model(len(tokenizer))
    before = benign_perplexity(model, tokenizer, HARMFUL[:3])
    seen = []

    def measure(m):
        assert not m.training and all(p.grad is None for p in m.parameters())
        seen.append(1)
        return {"benign_ppl": benign_perplexity(m, tokenizer, HARMFUL[:3])}

    with probing(Probe(measure, every=2)):
        probed = finetune(model, tokenizer, HARMFUL, cfg, tmp_path / "loss.jsonl")
    finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, cfg)  # outside the block: no probe
    assert len(seen) == 4
    assert [p["updates"] for p in probed.probes] == [0, 2, 4, 5]
    assert probed.probes[0]["benign_ppl"] == before
    assert probed.probes[-1]["benign_ppl"] == pytest.approx(benign_perplexity(probed.model, tokenizer, HARMFUL[:3]))
    assert probed.probes[-1]["benign_ppl"] < before  # trained on these very answers
    assert probed.losses == plain.losses
    assert all(torch.equal(a, b) for a, b in zip(probed.model.parameters(), plain.model.parameters(), strict=True))
    rows = [json.loads(x) for x in (tmp_path / "loss.probe.jsonl").read_text().splitlines()]
    assert rows == probed.probes


def test_a_probe_refuses_a_bad_interval():
    from seamlm.finetune import Probe

    with pytest.raises(ConfigError, match="every=0"):
        Probe(lambda m: {}, every=0)


@pytest.mark.parametrize("ratio", [0.03, 0.1, 0.25])
def test_warmup_steps_are_counted_as_the_hf_trainer_counts_them(ratio, tmp_path):
    from transformers import TrainingArguments

    from seamlm.finetune import warmup_steps

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to=[])  # < 1: a ratio (v5)
    for n in (7, 15, 30, 51, 125, 250):
        assert warmup_steps(ratio, n) == args.get_warmup_steps(n)


def test_a_coupling_probe_leaves_a_lora_attack_as_it_would_have_been(tokenizer):
    """The coupling probe back-propagates through the model; under LoRA the live adapters' gradients are the
    attack's own, so its backward must not add to them (it did: every probed LoRA step trained on the probe's
    harmful and benign gradients too)."""
    from seamlm.evaluate.metrics import gradient_coupling
    from seamlm.finetune import Probe, probing

    cfg = FinetuneConfig(lr=5e-3, batch_size=2, max_steps=4, epochs=2, lora=True, lora_r=2)
    plain = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, cfg)
    probe = Probe(lambda m: gradient_coupling(m, tokenizer, HARMFUL[:2], BENIGN[:2]), every=1)
    with probing(probe):
        probed = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL, cfg)
    assert len(probed.probes) == 5 and all(math.isfinite(p["coupling_cos"]) for p in probed.probes)
    assert probed.losses == pytest.approx(plain.losses, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(probed.model.parameters(), plain.model.parameters(),
                                                                 strict=True))


def test_max_steps_beyond_the_plan_is_said_not_silently_capped(tokenizer, caplog):
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, max_steps=50, epochs=1)
    with caplog.at_level("WARNING"):
        res = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL[:8], cfg)
    assert res.steps == 2 and "max_steps=50 exceeds the 2 steps of 1 epoch(s) over 8 examples" in caplog.text


def test_a_warm_up_that_takes_every_step_is_said(caplog):
    from seamlm.finetune import warmup_steps

    assert warmup_steps(0.1, 5) == 1 and "warm-up takes" not in caplog.text
    assert warmup_steps(0.1, 1) == 1
    assert "warm-up takes all 1 step(s)" in caplog.text and "only step runs at lr 0, so nothing is trained" in caplog.text
    assert warmup_steps(0.0, 1) == 0
