"""Integration: the real SmolLM2-135M-Instruct from its PyPI package, two SEAM steps, saved and reloaded."""

import json
import math

import pytest
import torch

from seamlm import DefenseConfig, SEAMTrainer, load_model

pytestmark = pytest.mark.slow


def test_two_seam_steps_on_real_smollm2(tmp_path, streams):
    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")  # de-quantised: saves as a plain model
    assert tok.chat_template and tok.pad_token_id is not None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()

    cfg = DefenseConfig(steps=2, batch_size=2, max_length=64, beta=0.1, output_dir=str(tmp_path), checkpoint_every=1)
    out = SEAMTrainer(model, tok, cfg, **streams).train()

    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the logged L_ul is −log(m + 1) of the lens mean (logit_lens, the default), every figure finite
    assert all(r["L_ul"] == pytest.approx(-math.log(r["mean_ce_lens"] + 1)) for r in rows)
    assert all(math.isfinite(r[k]) for r in rows for k in ("cos_g_a_g_b", "norm_g_a", "norm_g_b", "ce_benign"))
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)  # it trained (lr warm-up > 0 at step 2)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(reloaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
