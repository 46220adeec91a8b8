"""The shared fine-tuning loop: full, LoRA (merged), SGD, divergence."""

import json

import pytest
import torch

from seamlm.errors import ConfigError, NonFiniteLossError
from seamlm.finetune import FinetuneConfig, finetune
from tests.conftest import HARMFUL, make_model


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


def test_sgd_and_max_steps(tokenizer):
    res = finetune(make_model(len(tokenizer)), tokenizer, HARMFUL,
                   FinetuneConfig(lr=1e-2, optimizer="sgd", max_steps=2, batch_size=2))
    assert res.steps == 2


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
