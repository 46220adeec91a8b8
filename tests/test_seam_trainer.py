"""SEAMTrainer on tiny random llamas: the coupling works, resume is exact, NaN stops cleanly."""

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from seamlm import DefenseConfig, SEAMTrainer
from seamlm.checkpoint import CHECKPOINT_FILE, list_checkpoints
from seamlm.defense.losses import answer_ce
from seamlm.errors import CheckpointError, ConfigError, NonFiniteLossError
from tests.conftest import make_model
from tests.test_coupling import exact_cos_grad


def _rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _trainer(tokenizer, streams, out, callbacks=None, model=None, **cfg):
    base = {"steps": 6, "batch_size": 2, "lr": 1e-3, "max_length": 64, "checkpoint_every": 0, "seed": 1}
    config = DefenseConfig(output_dir=str(out), **{**base, **cfg})
    model = model if model is not None else make_model(len(tokenizer), seed=5)
    return SEAMTrainer(model, tokenizer, config, callbacks=callbacks, **streams)


@pytest.mark.slow
def test_coupling_drives_cosine_negative_without_breaking_benign_ce(tokenizer, streams, tmp_path):
    tr = _trainer(tokenizer, streams, tmp_path, steps=300, beta=1.0, batch_size=4, warmup_ratio=0.0,
                  unlearn_loss="final_layer")
    tr.train()
    rows = _rows(tmp_path)
    first, last = rows[0], rows[-20:]
    assert first["cos_g_a_g_b"] > -0.5
    assert max(r["cos_g_a_g_b"] for r in last) < -0.5
    assert sum(r["ce_benign"] for r in last) / len(last) < 1.5 * first["ce_benign"]


@pytest.mark.slow
def test_without_coupling_cosine_is_not_pushed_down(tokenizer, streams, tmp_path):
    """Control for the test above, with the same steps, schedule and window: β = 0 must not produce the same drop
    (else L_ul + α·L_up alone would explain it and the test above would prove nothing)."""
    tr = _trainer(tokenizer, streams, tmp_path, steps=300, beta=0.0, batch_size=4, warmup_ratio=0.0,
                  unlearn_loss="final_layer")
    tr.train()
    assert min(r["cos_g_a_g_b"] for r in _rows(tmp_path)[-20:]) > -0.5


def test_a_tokenizer_without_a_pad_token_pads_with_eos(streams, tmp_path):
    """Llama tokenizers ship without a pad token; the Python API must not fail deep inside collate."""
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    out = _trainer(tok, streams, tmp_path, steps=1).train()
    assert tok.pad_token == tok.eos_token and (out / "model.safetensors").is_file()


def test_a_tokenizer_without_pad_or_eos_is_a_clear_error(streams, tmp_path):
    from tests.conftest import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ConfigError, match="neither a pad token nor an EOS token"):
        _trainer(tok, streams, tmp_path, steps=1)


def test_log_has_every_field_and_model_is_saved(tokenizer, streams, tmp_path):
    out = _trainer(tokenizer, streams, tmp_path, steps=3).train()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("L_ul", "L_up", "ce_harmful", "ce_benign", "norm_g_a", "norm_g_b", "cos_g_a_g_b", "step_time_s", "lr"):
        assert all(isinstance(r[key], float) for r in rows), key
    # L_ul = −log(m + 1) with m the lens mean, so L_ul ≤ −log(CE_H/(L+1) + 1) is not guaranteed; check the identity
    assert all(r["L_ul"] == pytest.approx(-math.log(r["mean_ce_lens"] + 1), rel=1e-12) for r in rows)  # float64, as m
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["seed"] == 1 and "torch" in run["versions"] and run["data_sizes"]["harmful"] == 12
    assert run["versions"]["cpu"] and run["versions"]["torch_cpu_capability"]  # float rounding depends on them
    assert (out / "model.safetensors").is_file() and (out / "seamlm_run.json").is_file()


def test_seam_step_changes_parameters_in_the_expected_direction(tokenizer, streams, tmp_path):
    """With α = 0 and β = 0 the step is pure bounded ascent: CE on the harmful batch must rise."""
    tr = _trainer(tokenizer, streams, tmp_path, steps=1, alpha=0.0, beta=0.0, warmup_ratio=0.0,
                  lr_scheduler="constant", unlearn_loss="final_layer")
    before = tr.compute_update(0)["ce_harmful"]
    tr._apply_update(tr.total.norm().item())
    after = tr.compute_update(0)["ce_harmful"]
    assert after > before


@pytest.mark.parametrize("unlearn", ["final_layer", "logit_lens"])
def test_update_without_coupling_is_the_autograd_gradient_of_l_ul_plus_alpha_l_up(tokenizer, streams, tmp_path,
                                                                                   unlearn):
    """β = 0: the flat update is ∇(−log(m + 1) + α·CE(R)) with m the mean of the final and lens CEs on H, as
    autograd gives it in float64 (the hand-written chain rule −∇m/(m + 1), ∇m = Σ∇CE_l/(L + 1), and α's sign)."""
    from seamlm.defense.losses import harmful_forward, unlearn_loss

    alpha = 0.5
    model = make_model(len(tokenizer), dtype=torch.float64, seed=5)
    tr = _trainer(tokenizer, streams, tmp_path, model=model, alpha=alpha, beta=0.0, unlearn_loss=unlearn)
    row = tr.compute_update(0)
    (bh,), (br,) = tr._micro_batches("harmful", 0), tr._micro_batches("refusal", 0)
    params = list(model.parameters())
    hf = harmful_forward(model, bh, unlearn)
    assert (hf.num_terms > 1) == (unlearn == "logit_lens")
    loss = unlearn_loss(hf.mean_ce) + alpha * answer_ce(model, br)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    # 1e-6, not 1e-15: the llama's RMSNorm computes in float32 even in a float64 model; a wrong scale, sign or
    # missing term is off by O(1)
    assert ((tr.total - want).norm() / want.norm()).item() < 1e-6
    assert row["L_ul"] == pytest.approx(unlearn_loss(hf.mean_ce).item(), rel=1e-10)
    assert row["L_up"] == pytest.approx(answer_ce(model, br).item(), rel=1e-10)


@pytest.mark.parametrize(("lookahead_steps", "weight"), [(1, 1.0), (2, 1.0), (1, 0.25)])
def test_lookahead_coupling_is_the_gradient_of_cos_at_the_simulated_attack_point(tokenizer, streams, tmp_path,
                                                                                 lookahead_steps, weight):
    """lookahead_lr = η: the coupling term is β·∇cos(g_a, g_b) at θ' = θ − η·Σ sign(g_a) (exact gradient by double
    back-prop, float64), not at θ — or, with lookahead_weight w < 1, β·((1 − w)·∇cos at θ + w·∇cos at θ'); the rest
    of the update and the parameters at θ are untouched."""
    eta, beta = 2e-2, 0.5
    model = make_model(len(tokenizer), dtype=torch.float64, seed=5)
    theta = [p.detach().clone() for p in model.parameters()]
    common = {"alpha": 0.5, "epsilon": 1e-4, "unlearn_loss": "final_layer", "warmup_ratio": 0.0}
    plain = _trainer(tokenizer, streams, tmp_path / "plain", model=model, beta=0.0, **common)
    plain.compute_update(0)
    rest = plain.total.clone()  # ∇L_ul + α∇L_up at θ
    ahead = _trainer(tokenizer, streams, tmp_path / "ahead", model=model, beta=beta, lookahead_lr=eta,
                     lookahead_steps=lookahead_steps, lookahead_weight=weight, **common)
    row = ahead.compute_update(0)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True))  # θ restored bit-exactly

    params = list(model.parameters())
    bh, bb = ahead._micro_batches("harmful", 0)[0], ahead._micro_batches("benign", 0)[0]
    def cos_here():
        g_a, g_b = (torch.cat([g.reshape(-1) for g in torch.autograd.grad(answer_ce(model, b), params)])
                    for b in (bh, bb))
        return torch.nn.functional.cosine_similarity(g_a, g_b, dim=0).item()

    at_theta, cos_theta = exact_cos_grad(model, params, bh, bb), cos_here()
    for _ in range(lookahead_steps):
        grads = torch.autograd.grad(answer_ce(model, bh), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(torch.sign(g), alpha=eta)
    at_ahead, cos_ahead = exact_cos_grad(model, params, bh, bb), cos_here()
    got = (ahead.total - rest) / beta
    want = (1 - weight) * at_theta + weight * at_ahead
    assert ((got - want).norm() / want.norm()).item() < 5e-3  # the O(ε) of the estimate
    assert ((at_theta - at_ahead).norm() / at_ahead.norm()).item() > 0.1  # so the test tells θ' from θ
    # the logged cosines are the autograd ones at θ and θ', and L_sd mixes them with the weight
    assert row["cos_g_a_g_b"] == pytest.approx(cos_theta, abs=1e-6)
    assert row["cos_lookahead"] == pytest.approx(cos_ahead, abs=1e-6) and abs(cos_ahead - cos_theta) > 1e-3
    assert row["L_sd"] == pytest.approx((1 - weight) * cos_theta + weight * cos_ahead, abs=1e-6)
    assert row["ce_harmful_lookahead"] < row["ce_harmful"]  # the simulated attacker descended on H


@pytest.mark.parametrize("unlearn", ["final_layer", "logit_lens"])
def test_resume_continues_the_same_trajectory(tokenizer, streams, tmp_path, unlearn):
    full = tmp_path / "full"
    _trainer(tokenizer, streams, full, steps=8, beta=0.5, unlearn_loss=unlearn).train()

    class Killed(Exception):
        pass

    def kill_at_4(trainer, row):
        if row["step"] == 5:  # killed after step 5; the last checkpoint is step 4
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        _trainer(tokenizer, streams, part, steps=8, beta=0.5, checkpoint_every=2, unlearn_loss=unlearn,
                 callbacks=[kill_at_4]).train()
    assert [p.name for p in list_checkpoints(part / "checkpoints")] == ["step-0000002", "step-0000004"]
    _trainer(tokenizer, streams, part, steps=8, beta=0.5, checkpoint_every=2, unlearn_loss=unlearn,
             model=make_model(len(tokenizer), seed=99)).train(resume=True)
    a, b = _rows(full), _rows(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        for key in ("L_ul", "L_up", "ce_benign", "cos_g_a_g_b", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    # and the same weights at the end, not only the same logged scalars
    from safetensors.torch import load_file

    wa, wb = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], msg=k)


def test_resume_with_changed_config_is_refused(tokenizer, streams, tmp_path):
    _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2).train()
    shutil.rmtree(tmp_path / "model")  # killed after its step-2 checkpoint
    with pytest.raises(CheckpointError, match="beta"):
        _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2, beta=0.3).train(resume=True)
    with pytest.raises(CheckpointError, match="--resume"):
        _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2).train()


def test_resume_compares_a_field_the_checkpoint_predates_at_its_default(tokenizer, streams, tmp_path):
    """A checkpoint written before a field existed ran with that field at its default: resuming with another value
    changes the objective and is refused; resuming with the default is not."""
    from seamlm.checkpoint import CHECKPOINT_FILE

    common = {"steps": 4, "checkpoint_every": 2, "beta": 0.5, "lookahead_lr": 1e-2, "unlearn_loss": "final_layer"}
    _trainer(tokenizer, streams, tmp_path, **common).train()
    shutil.rmtree(tmp_path / "model")
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):  # as if written before lookahead_weight existed
        state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
        del state["config"]["lookahead_weight"]
        torch.save(state, ckpt / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=r"lookahead_weight: 1\.0 -> 0\.5"):
        _trainer(tokenizer, streams, tmp_path, lookahead_weight=0.5, **common).train(resume=True)
    _trainer(tokenizer, streams, tmp_path, **common).train(resume=True)
    assert [r["step"] for r in _rows(tmp_path)][-1] == 4


def test_resume_from_another_base_model_is_refused(tokenizer, streams, tmp_path):
    """The weights come from the checkpoint, but the saved model would name the new --model as its base (and check
    held-out data against that one's training prompts)."""
    def trainer(identity):
        tr = _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2)
        tr.run_info = {"model": f"models/{identity}", "model_identity": f"sha256:{identity}"}
        return tr

    trainer("aaa").train()
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"started from models/aaa \(sha256:aaa\), this one names models/bbb"):
        trainer("bbb").train(resume=True)
    assert json.loads((tmp_path / "run.json").read_text())["model_identity"] == "sha256:aaa"  # left as it was
    trainer("aaa").train(resume=True)
    assert (tmp_path / "model").is_dir()


def test_resume_with_the_model_in_another_dtype_is_refused(tokenizer, streams, tmp_path):
    """The load dtype is part of the run (save_dtype auto saves back in it): a resume that loads the model in
    another one would silently save another model."""
    _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2).train()
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(CheckpointError, match="loaded the model in torch.float32, this one in torch.bfloat16"):
        _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2,
                 model=make_model(len(tokenizer), dtype=torch.bfloat16)).train(resume=True)
    _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2).train(resume=True)
    assert (tmp_path / "model").is_dir()


def test_resume_on_a_device_whose_auto_compute_dtype_differs_is_refused(tokenizer, streams, tmp_path):
    """compute_dtype auto is bf16 on CUDA and fp32 on CPU: a CUDA run resumed here would change its objective's
    precision without a word, so the checkpoint records what auto resolved to."""
    from seamlm.checkpoint import CHECKPOINT_FILE

    _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2).train()
    shutil.rmtree(tmp_path / "model")
    for ckpt in list_checkpoints(tmp_path / "checkpoints"):  # as a CUDA run would have written it
        state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
        assert state["compute_dtype"] == "float32"
        state["compute_dtype"] = "bfloat16"
        torch.save(state, ckpt / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="computed L_ul and L_up in bfloat16, this one would in float32"):
        _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2).train(resume=True)
    _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2, compute_dtype="bfloat16").train(resume=True)
    assert [r["step"] for r in _rows(tmp_path)][-1] == 4


def test_resume_across_the_micro_batch_weighting_change_is_refused(tokenizer, streams, tmp_path):
    """A checkpoint from before SEAM weighted micro-batches by answer tokens: with several micro-batches per step the
    objective changed, so the run is not continued under another one; with one micro-batch nothing changed."""
    from seamlm.checkpoint import CHECKPOINT_FILE

    for accumulation in (2, 1):
        out = tmp_path / f"acc{accumulation}"
        _trainer(tokenizer, streams, out, steps=4, checkpoint_every=2, gradient_accumulation_steps=accumulation).train()
        shutil.rmtree(out / "model")
        for ckpt in list_checkpoints(out / "checkpoints"):  # as a seamlm before the change wrote it
            state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
            assert state.pop("ce_weighting") == "answer_tokens"
            torch.save(state, ckpt / CHECKPOINT_FILE)
        resumed = _trainer(tokenizer, streams, out, steps=4, checkpoint_every=2, gradient_accumulation_steps=accumulation)
        if accumulation == 1:
            resumed.train(resume=True)
            continue
        with pytest.raises(CheckpointError, match=r"averaged the CEs of its 2 micro-batches.*start a new run"):
            resumed.train(resume=True)


def test_warmup_is_rounded_up_as_the_hf_trainer_counts_it(tokenizer, streams, tmp_path):
    """5 steps × ratio 0.1: one warm-up step (lr 0), as `transformers.TrainingArguments.get_warmup_steps` gives."""
    _trainer(tokenizer, streams, tmp_path, steps=5, warmup_ratio=0.1, checkpoint_every=2).train()
    lrs = [r["lr"] for r in _rows(tmp_path)]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3, rel=0.2)


def test_resuming_a_checkpoint_whose_warmup_was_rounded_down_is_refused(tokenizer, streams, tmp_path):
    _trainer(tokenizer, streams, tmp_path, steps=5, warmup_ratio=0.1, checkpoint_every=2).train()
    shutil.rmtree(tmp_path / "model")
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=False)
    assert state.pop("warmup_steps") == 1
    torch.save(state, ckpt / CHECKPOINT_FILE)  # as a seamlm before the change wrote it: int(0.5) = 0 steps
    with pytest.raises(CheckpointError, match="warmed up for 0 steps.*this seamlm warms up for 1"):
        _trainer(tokenizer, streams, tmp_path, steps=5, warmup_ratio=0.1, checkpoint_every=2).train(resume=True)


def test_resume_without_checkpoint_is_an_error(tokenizer, streams, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _trainer(tokenizer, streams, tmp_path).train(resume=True)


def test_nan_stops_with_clear_message_and_keeps_last_good_checkpoint(tokenizer, streams, tmp_path):
    def poison(trainer, row):
        if row["step"] == 3:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    tr = _trainer(tokenizer, streams, tmp_path, steps=6, checkpoint_every=2, callbacks=[poison])
    with pytest.raises(NonFiniteLossError, match=r"step 4: non-finite .*step-0000002"):
        tr.train()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000002"]
    state = torch.load(ckpts[0] / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bf16_model_gets_fp32_master_weights_and_is_saved_back_in_bf16(tokenizer, streams, tmp_path):
    model = make_model(len(tokenizer), dtype=torch.bfloat16)
    tr = _trainer(tokenizer, streams, tmp_path, steps=2, model=model)
    assert all(p.dtype == torch.float32 for p in tr.params)
    out = tr.train()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_model_trains_its_adapters_and_is_saved_merged(tokenizer, streams, tmp_path, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_model(len(tokenizer), dtype=dtype, seed=5)
    before = {n: p.detach().float().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    tr = _trainer(tokenizer, streams, tmp_path, steps=2, model=model, lr=1e-2)
    assert tr.flat.total_numel == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    out = tr.train()
    saved = AutoModelForCausalLM.from_pretrained(out)  # a plain HF directory, in the model's own dtype
    assert saved.dtype == dtype and not any("lora" in n for n, _ in saved.named_parameters())
    after = {n: p.detach().float() for n, p in saved.named_parameters()}
    assert after.keys() == before.keys()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved)
    assert json.loads((out / "seamlm_run.json").read_text())["lora_merged"] is True


def test_a_bf16_model_with_frozen_layers_trains_in_float32(tokenizer, streams, tmp_path):
    """Frozen bf16 weights would meet float32 activations in the coupling passes (no autocast there)."""
    model = make_model(len(tokenizer), dtype=torch.bfloat16)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    tr = _trainer(tokenizer, streams, tmp_path, steps=1, model=model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    frozen = [p.detach().clone() for p in model.model.layers[0].parameters()]
    tr.train()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.model.layers[0].parameters(), strict=True))


@pytest.mark.parametrize("unlearn_loss", ["logit_lens", "final_layer"])
def test_gradient_accumulation_matches_one_big_batch(tokenizer, streams, tmp_path, unlearn_loss):
    """Micro-batches weighted by their answer tokens give the one-batch answer-token mean, also when their answers
    differ in length (a mean of micro-batch means would not: the check below that the lengths differ keeps this
    test able to fail)."""
    from seamlm.data.format import answer_token_count

    a = _trainer(tokenizer, streams, tmp_path / "a", batch_size=4, gradient_accumulation_steps=1, beta=0.5,
                 unlearn_loss=unlearn_loss)
    b = _trainer(tokenizer, streams, tmp_path / "b", batch_size=2, gradient_accumulation_steps=2, beta=0.5,
                 unlearn_loss=unlearn_loss)
    for stream in ("harmful", "refusal", "benign"):
        counts = [answer_token_count(x) for x in b._micro_batches(stream, 0)]
        assert len(counts) == 2 and counts[0] != counts[1], (stream, counts)
    ra, rb = a.compute_update(0), b.compute_update(0)
    for key in ("ce_harmful", "ce_benign", "L_up", "L_ul", "cos_g_a_g_b"):
        assert rb[key] == pytest.approx(ra[key], rel=1e-4), key
    # fp32 finite differences carry rounding/ε noise, so compare the whole vector, not element by element
    assert ((a.total - b.total).norm() / a.total.norm()).item() < 1e-3


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tokenizer, streams, tmp_path, monkeypatch):
    """The step-4 checkpoint is written to /dev/full, a real device that answers every write with ENOSPC: torch's
    own writer meets the full disk, and the run stops with the fix and the checkpoint it can resume from."""
    import builtins

    import seamlm.checkpoint as ckpt

    def open_full_disk_at_step_4(path, *a, **kw):
        return builtins.open("/dev/full" if "step-0000004" in str(path) else path, *a, **kw)

    monkeypatch.setattr(ckpt, "open", open_full_disk_at_step_4, raising=False)
    tr = _trainer(tokenizer, streams, tmp_path, steps=6, checkpoint_every=2)
    with pytest.raises(CheckpointError, match=r"disk is full.*step-0000002.*defend` with --resume, `seamlm demo` by rerunning"):
        tr.train()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_at_the_first_checkpoint_says_to_rerun_without_resume(tokenizer, streams, tmp_path, monkeypatch):
    """With no earlier checkpoint, --resume would be refused: the message sends the user to a plain rerun."""
    import builtins

    import seamlm.checkpoint as ckpt

    def open_full_disk(path, *a, **kw):
        return builtins.open("/dev/full" if "step-" in str(path) else path, *a, **kw)

    monkeypatch.setattr(ckpt, "open", open_full_disk, raising=False)
    tr = _trainer(tokenizer, streams, tmp_path, steps=4, checkpoint_every=2)
    with pytest.raises(CheckpointError, match=r"step 2 .*disk is full\. No earlier checkpoint exists; free space, then "
                                              r"rerun the same command without --resume") as info:
        tr.train()
    assert "with --resume" not in str(info.value) and list_checkpoints(tmp_path / "checkpoints") == []


def test_bf16_compute_keeps_the_coupling_in_float32(tokenizer, streams, tmp_path):
    """Under bf16 autocast the coupling gradients must equal the float32 ones (a perturbation of ε·δ vanishes in
    bf16); only L_ul/L_up see the lower precision."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tr = _trainer(tokenizer, streams, tmp_path / dtype, compute_dtype=dtype, beta=0.5, unlearn_loss="logit_lens")
        runs[dtype] = (tr.compute_update(0), tr.g_a.clone(), tr.total.clone())
    (r32, ga32, u32), (r16, ga16, u16) = runs["float32"], runs["bfloat16"]
    torch.testing.assert_close(ga16, ga32, rtol=1e-4, atol=1e-6)
    # the whole update (∇L_ul + α∇L_up + β∇̂L_sd) agrees in direction; only the bf16 passes add rounding
    assert torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.99
    assert r16["cos_g_a_g_b"] == pytest.approx(r32["cos_g_a_g_b"], abs=1e-5)
    assert r16["L_ul"] == pytest.approx(r32["L_ul"], rel=2e-2) and r16["L_ul"] != r32["L_ul"]


def test_h_and_r_files_with_repeated_rows_stay_aligned(tokenizer, tmp_path):
    from seamlm.data.files import Example
    from tests.conftest import BENIGN, write_jsonl

    h = [Example("How do I do it?", "Step one."), Example("How do I do it?", "Step two."), Example("Other?", "Yes.")]
    r = [Example(e.prompt, "I can't help with that.") for e in h]  # rows 0 and 1 of R are identical
    files = {"harmful": write_jsonl(tmp_path / "h.jsonl", h), "refusal": write_jsonl(tmp_path / "r.jsonl", r),
             "benign": write_jsonl(tmp_path / "b.jsonl", BENIGN)}
    tr = _trainer(tokenizer, files, tmp_path / "out")
    assert tr.data_sizes["refusal"] == 3 and tr.samplers["refusal"].key == "harmful"
    # every step's H and R batches hold the same prompts, row by row (the refusal of the prompt being unlearned)
    from seamlm.data.format import IGNORE_INDEX

    def prompts(batch):
        return [ids[labels == IGNORE_INDEX][mask[labels == IGNORE_INDEX] == 1].tolist()
                for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)]

    for step in range(5):
        h_batches, r_batches = tr._micro_batches("harmful", step), tr._micro_batches("refusal", step)
        assert [prompts(b) for b in h_batches] == [prompts(b) for b in r_batches], step


def test_r_is_paired_with_h_by_prompt_when_a_row_was_lost_or_the_order_differs(caplog):
    from seamlm.data.files import Example
    from seamlm.defense.seam import pair_refusals

    h = [Example(f"Prompt {i}?", f"Answer {i}.") for i in range(4)] + [Example("Prompt 0?", "Again.")]
    r = [Example(f"prompt {i}", "I can't help.") for i in (3, 0, 2, 1, 9)]  # another order, a spare row
    paired, aligned = pair_refusals(h[1:], r)  # H lost its first row (a blank answer dropped on loading)
    assert aligned and [e.prompt for e in paired] == ["prompt 1", "prompt 2", "prompt 3", "prompt 0"]
    assert "1 R rows are left out" in caplog.text
    r2 = r + [Example("Prompt 0?", "No way.")]  # a prompt H holds twice takes its R rows in turn
    paired, aligned = pair_refusals(h, r2)
    assert aligned and [e.response for e in paired][::4] == ["I can't help.", "No way."]
    same, aligned = pair_refusals(h[:2], [Example(e.prompt, "No.") for e in h[:2]])
    assert aligned and [e.prompt for e in same] == ["Prompt 0?", "Prompt 1?"]
    unpaired, aligned = pair_refusals(h, r[:3])  # prompt 1 has no refusal
    assert not aligned and unpaired == r[:3] and "R refuses the prompts of 4 of H's 5 rows only" in caplog.text


def test_tf32_coupling_is_refused_off_cuda(tokenizer, streams, tmp_path):
    from seamlm.errors import ConfigError

    with pytest.raises(ConfigError, match="coupling_precision=tf32 needs a CUDA device"):
        _trainer(tokenizer, streams, tmp_path, coupling_precision="tf32")


def test_truncate_first_prompt_trains_refusals_to_long_prompts_whole(tokenizer, tmp_path):
    """SEAM's streams are encoded with the config's truncation: a refusal to a prompt longer than max_length keeps
    its end token with ``truncate_first="prompt"``, and loses it by default."""
    from seamlm.data.files import Example

    long = [Example("x" * 80 + f" request {i}?", "I can't help with that.") for i in range(4)]
    streams = {"harmful": [Example(e.prompt, "Sure, here it is.") for e in long], "refusal": long,
               "benign": [Example("What is 2+2?", "4.")] * 4}
    eos = tokenizer.eos_token_id
    by_default = _trainer(tokenizer, streams, tmp_path / "a", steps=1)
    assert all(r.input_ids[-1] != eos and len(r.input_ids) == 64 for r in by_default.data["refusal"])
    prompt_first = _trainer(tokenizer, streams, tmp_path / "b", steps=1, truncate_first="prompt")
    assert all(r.input_ids[-1] == eos and len(r.input_ids) == 64 for r in prompt_first.data["refusal"])


def test_gradient_checkpointing_that_eval_mode_switches_off_is_said(tokenizer, streams, tmp_path, caplog):
    model = make_model(len(tokenizer), seed=5)
    model.gradient_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tokenizer, streams, tmp_path, model=model, steps=1, warmup_ratio=0.0).train()
    assert "gradient checkpointing on, but SEAM runs it in eval mode" in caplog.text
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]  # the deprecated name is not read


def test_a_replicated_model_is_moved_to_the_ranks_device_and_a_meta_one_refused(tokenizer, streams, tmp_path):
    """Under several processes without FSDP every rank runs its whole model where its collectives run (NCCL cannot
    reduce CPU buffers): a model elsewhere is moved there. The context's device stands in for a GPU here."""
    from seamlm.distributed import DistContext
    from seamlm.errors import ConfigError

    model = make_model(len(tokenizer), seed=5)
    cfg = DefenseConfig(output_dir=str(tmp_path), steps=1, batch_size=1, max_length=32)
    SEAMTrainer(model, tokenizer, cfg, ctx=DistContext(rank=0, world_size=2, device=torch.device("meta")), **streams)
    assert next(model.parameters()).device.type == "meta"
    with pytest.raises(ConfigError, match="the model is on the meta device: only shard_parameters"):
        SEAMTrainer(model, tokenizer, cfg, ctx=DistContext(rank=0, world_size=2, device=torch.device("cpu")), **streams)
    cpu = make_model(len(tokenizer), seed=5)  # one process: the model stays where it is
    SEAMTrainer(cpu, tokenizer, cfg, ctx=DistContext(device=torch.device("meta")), **streams)
    assert next(cpu.parameters()).device.type == "cpu"
