"""Each SEAM loss term against a hand computation on a tiny batch."""

import math
import re

import pytest
import torch

from seamlm.data.files import Example
from seamlm.data.format import IGNORE_INDEX, Formatter, collate
from seamlm.defense.losses import answer_ce, harmful_forward, unlearn_loss
from seamlm.errors import ConfigError
from tests.conftest import make_model


@pytest.fixture
def batch(tokenizer):
    fmt = Formatter(tokenizer, max_length=64)
    rows = [fmt(Example("Tell me a secret", "No way")), fmt(Example("Hi", "Hello there friend"))]
    return collate(rows, tokenizer.pad_token_id)


def _manual_ce(logits, input_ids, labels):
    """Loop over every (row, position) by hand: −log softmax(logits[t])[token t+1] where label t+1 is an answer."""
    total, count = 0.0, 0
    for i in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            if labels[i, t + 1] == IGNORE_INDEX:
                continue
            logp = logits[i, t].double().log_softmax(-1)
            total += -logp[labels[i, t + 1]].item()
            count += 1
    return total / count


def test_answer_ce_is_mean_over_answer_tokens_only(tokenizer, batch):
    model = make_model(len(tokenizer)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = answer_ce(model, batch).item()
    assert got == pytest.approx(_manual_ce(logits, batch["input_ids"], batch["labels"]), rel=1e-5)
    # and it is not the all-token loss
    all_tok = batch["labels"].clone()
    all_tok[batch["attention_mask"] == 1] = batch["input_ids"][batch["attention_mask"] == 1]
    assert got != pytest.approx(_manual_ce(logits, batch["input_ids"], all_tok), rel=1e-3)


def test_logit_lens_terms_and_unlearn_loss(tokenizer, batch):
    model = make_model(len(tokenizer), layers=3).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hf = harmful_forward(model, batch, "logit_lens")
        lens = [model.lm_head(model.model.norm(h)) for h in out.hidden_states[:-1]]
    expected = [_manual_ce(lg, batch["input_ids"], batch["labels"]) for lg in lens]
    expected_final = _manual_ce(out.logits, batch["input_ids"], batch["labels"])
    assert hf.num_terms == 4  # L + 1 with L = 3 layers
    assert [t.item() for t in hf.ce_lens] == pytest.approx(expected, rel=1e-5)
    assert hf.ce_final.item() == pytest.approx(expected_final, rel=1e-5)
    m = (expected_final + sum(expected)) / 4
    assert hf.mean_ce.item() == pytest.approx(m, rel=1e-5)
    assert unlearn_loss(hf.mean_ce).item() == pytest.approx(-math.log(m + 1), rel=1e-5)


def test_final_layer_variant_has_no_lens_terms(tokenizer, batch):
    model = make_model(len(tokenizer)).eval()
    hf = harmful_forward(model, batch, "final_layer")
    assert hf.ce_lens == [] and hf.num_terms == 1
    assert hf.mean_ce.item() == pytest.approx(hf.ce_final.item())


def test_lens_gradient_equals_plain_autograd(tokenizer, batch):
    """Activation checkpointing of the lens terms must not change the gradient."""
    model = make_model(len(tokenizer), layers=2, dtype=torch.float64).eval()
    hf = harmful_forward(model, batch, "logit_lens")
    g_ckpt = torch.autograd.grad(unlearn_loss(hf.mean_ce), list(model.parameters()))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    tgt = batch["labels"][:, 1:][keep]
    terms = [torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(h))[:, :-1][keep], tgt)
             for h in out.hidden_states[:-1]]
    terms.append(torch.nn.functional.cross_entropy(out.logits[:, :-1][keep], tgt))
    g_ref = torch.autograd.grad(-torch.log(sum(terms) / len(terms) + 1), list(model.parameters()))
    for a, b in zip(g_ckpt, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_batch_without_answer_tokens_is_an_error(tokenizer, batch):
    model = make_model(len(tokenizer))
    batch = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_ce(model, batch)


@pytest.mark.parametrize("arch,kw", [("Granite", {"logits_scaling": 4.0}), ("Cohere", {"logit_scale": 0.25}),
                                     ("HyperCLOVAX", {"logits_scaling": 4.0}), ("Llama", {})])
def test_the_head_the_losses_call_gives_the_models_own_logits(arch, kw):
    """Losses and the zero-shot scorer call the output head directly: a model that scales its logits in its own
    forward (Granite divides, Cohere and HyperCLOVAX multiply) must get the same logits there."""
    import transformers

    from seamlm.defense.losses import ModelParts

    cfg = getattr(transformers, f"{arch}Config")(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 eos_token_id=1, bos_token_id=0, pad_token_id=2, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    ids = torch.randint(0, 64, (1, 5))
    parts = ModelParts.of(model)
    with torch.no_grad():
        ours = parts.logits(parts.decoder(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(ours, model(ids).logits)


def test_a_model_whose_forward_changes_its_logits_in_an_unknown_way_is_refused_at_load(tiny_model_dir, monkeypatch):
    """The load-time check compares the model's own logits with the head seamlm calls: an unknown scaling is an
    error naming the model, not a different objective trained in silence."""
    import transformers

    from seamlm.defense.losses import check_logit_head
    from seamlm.models import load_model

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    check_logit_head(model, "plain")  # the Llama head as seamlm calls it
    assert model.training  # its mode is left as it was

    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits * 3.0
            return out

    with pytest.raises(ConfigError, match=r"odd \(Scaled, model_type 'llama'\) post-processes its logits"):
        check_logit_head(Scaled(cfg), "odd")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: Scaled.from_pretrained(path, **kw))
    with pytest.raises(ConfigError, match=f"{re.escape(str(tiny_model_dir))} .*post-processes its logits"):
        load_model(str(tiny_model_dir))
