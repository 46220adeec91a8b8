"""The CUDA path: bf16 autocast with float32 master weights, the Hessian-free estimate under TF32, the defence CLI,
resume, fine-tuning and batched generation on a GPU. Skipped where torch sees no CUDA device (CI has none); run on
a GPU machine with ``pytest -m gpu -s``. ``SEAMLM_GPU_TESTS_DEVICE=cpu`` runs their logic on the CPU instead (a
dry run for machines without a GPU; it proves nothing about CUDA)."""

import contextlib
import json
import os
import shutil

import pytest
import torch

from seamlm.cli import main
from seamlm.defense import coupling
from seamlm.finetune import FinetuneConfig, finetune
from seamlm.generation import generate_answers
from tests.conftest import BENIGN, HARMFUL, make_model
from tests.test_coupling import _batch, estimate, exact_cos_grad
from tests.test_seam_trainer import _rows, _trainer

CUDA = torch.device(os.environ.get("SEAMLM_GPU_TESTS_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def _tf32_on_in_the_process():
    """TF32 on, as a user's training script often does (``set_float32_matmul_precision("high")``); the exact
    per-backend settings are put back after."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def _relative_error(est, exact):
    return ((est.double() - exact).norm() / exact.norm()).item()


def _estimate_as_the_trainer_does(model, bh, bb):
    """g_a, g_b and their perturbed recomputations under one precision guard, as SEAMTrainer.compute_update."""
    with coupling.float32_matmul():
        return estimate(model, list(model.parameters()), bh, bb, eps=1e-3)


def test_estimate_on_cuda_matches_the_exact_gradient_even_with_tf32_enabled(tokenizer, monkeypatch):
    """A process that turned TF32 on (common on Ampere+) must still get the float32 estimate: the coupling's
    differences are computed at IEEE precision. Without the guard the same estimate is printed for comparison."""
    m64 = make_model(len(tokenizer), dtype=torch.float64, seed=3, hidden=64).to(CUDA).eval()
    bh, bb = _to(_batch(tokenizer, HARMFUL[:4]), CUDA), _to(_batch(tokenizer, BENIGN[:4]), CUDA)
    exact = exact_cos_grad(m64, list(m64.parameters()), bh, bb)
    m32 = make_model(len(tokenizer), dtype=torch.float64, seed=3, hidden=64).float().to(CUDA).eval()
    reference = _estimate_as_the_trainer_does(m32, bh, bb)  # default precision: IEEE float32
    with _tf32_on_in_the_process():
        guarded = _estimate_as_the_trainer_does(m32, bh, bb)
        monkeypatch.setattr(coupling, "float32_matmul", lambda precision="ieee": contextlib.nullcontext())
        unguarded = _estimate_as_the_trainer_does(m32, bh, bb)
    errors = {"ieee": _relative_error(reference, exact), "tf32_on_guarded": _relative_error(guarded, exact),
              "tf32_on_unguarded": _relative_error(unguarded, exact)}
    print("relative error vs exact (float64):", json.dumps(errors))
    # the guarded estimate is the IEEE one (up to CUDA's non-deterministic reduction order)
    assert errors["tf32_on_guarded"] < 1.5 * errors["ieee"] + 1e-3, errors
    assert errors["ieee"] < 0.05, errors
    if CUDA.type == "cuda" and torch.cuda.get_device_capability(CUDA)[0] >= 8:  # TF32 exists from Ampere on
        # the control: without the guard TF32 did reach the coupling and hurt it (else this test proves nothing)
        assert errors["tf32_on_unguarded"] > 3 * errors["ieee"], errors


def test_seam_step_on_cuda_agrees_with_cpu_and_bf16_keeps_the_coupling_in_float32(tokenizer, streams, tmp_path):
    cpu = _trainer(tokenizer, streams, tmp_path / "cpu", beta=0.5, unlearn_loss="logit_lens")
    r_cpu = cpu.compute_update(0)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model(len(tokenizer), seed=5).to(CUDA)
        tr = _trainer(tokenizer, streams, tmp_path / dtype, model=model, compute_dtype=dtype, beta=0.5,
                      unlearn_loss="logit_lens")
        assert tr.total.device.type == CUDA.type
        runs[dtype] = (tr.compute_update(0), tr.g_a.clone(), tr.total.clone())
    (r32, ga32, u32), (r16, ga16, u16) = runs["float32"], runs["bfloat16"]
    # the same step on CPU and CUDA (float32)
    assert r32["cos_g_a_g_b"] == pytest.approx(r_cpu["cos_g_a_g_b"], abs=1e-4)
    assert torch.nn.functional.cosine_similarity(u32.cpu(), cpu.total, dim=0) > 0.999
    # bf16 autocast: the coupling gradients are still float32, only L_ul/L_up see bf16
    torch.testing.assert_close(ga16, ga32, rtol=1e-3, atol=1e-5)
    assert r16["cos_g_a_g_b"] == pytest.approx(r32["cos_g_a_g_b"], abs=1e-4)
    assert torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.99
    assert r16["L_ul"] != r32["L_ul"]  # autocast did run in bf16


def test_defend_cli_on_cuda_writes_a_bf16_model_and_resumes(tokenizer, data_files, tmp_path):
    d = tmp_path / "bf16-model"
    make_model(len(tokenizer), dtype=torch.bfloat16).save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "run"
    args = ["defend", "--model", str(d), "--harmful", str(data_files["harmful"]), "--refusal",
            str(data_files["refusal"]), "--benign", str(data_files["benign"]), "--out", str(out), "--device", str(CUDA),
            "--dtype", "bfloat16", "--steps", "4", "--batch_size", "2", "--max_length", "64", "--checkpoint_every", "2"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["device"].startswith(CUDA.type), run["device"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model").dtype == torch.bfloat16
    full = _rows(out)
    shutil.rmtree(out / "model")
    for ckpt in sorted((out / "checkpoints").iterdir())[1:]:  # keep step 2 only: as if killed after step 2
        shutil.rmtree(ckpt)
    assert main([*args, "--resume"]) == 0
    resumed = _rows(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # the checkpoint's rows kept once, the rest recomputed
    assert resumed[:2] == full[:2]
    for ra, rb in zip(full[-2:], resumed[-2:], strict=True):
        for key in ("L_ul", "L_up", "ce_benign", "cos_g_a_g_b"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), (ra["step"], key)


def test_finetune_and_batched_generation_on_cuda_bf16(tokenizer):
    model = make_model(len(tokenizer), dtype=torch.bfloat16, seed=2).to(CUDA)
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, max_length=64, epochs=6, warmup_ratio=0.0, seed=0)
    result = finetune(model, tokenizer, HARMFUL, cfg)
    losses = [r["loss"] for r in result.logs]
    assert next(result.model.parameters()).device.type == CUDA.type
    assert losses[-1] < 0.7 * losses[0], losses
    prompts = [e.prompt for e in HARMFUL[:6]]
    batched = generate_answers(result.model, tokenizer, prompts, max_new_tokens=12, batch_size=6)
    single = generate_answers(result.model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    # bf16 kernels may pick different reduction orders per batch shape; greedy answers must still mostly agree
    assert sum(a == b for a, b in zip(batched, single, strict=True)) >= 4, (batched, single)


@pytest.mark.parametrize("lookahead_lr", [0.0, 1e-2])
def test_tf32_coupling_runs_the_coupling_passes_in_tf32_and_stays_close_at_a_larger_epsilon(
        tokenizer, streams, tmp_path, monkeypatch, lookahead_lr):
    import seamlm.defense.losses as losses_mod

    seen, real_forward = [], losses_mod.harmful_forward

    def recording_forward(model, batch, variant):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        return real_forward(model, batch, variant)

    # every CE pass of a SEAM step (AnswerLosses.forward) goes through harmful_forward; the CPU dry run runs the
    # IEEE half, so CI fails if the patch target is renamed or leaves the CE path
    monkeypatch.setattr(losses_mod, "harmful_forward", recording_forward)
    runs = {}
    for precision in ("ieee", "tf32") if CUDA.type == "cuda" else ("ieee",):
        seen.clear()
        model = make_model(len(tokenizer), seed=5, hidden=64).to(CUDA)
        tr = _trainer(tokenizer, streams, tmp_path / precision, model=model, beta=0.5, epsilon=1e-2,
                      coupling_precision=precision, unlearn_loss="final_layer", compute_dtype="float32",
                      lookahead_lr=lookahead_lr)
        runs[precision] = (tr.compute_update(0), tr.total.clone())
        # every CE pass of the step ran at the asked precision (5 without the look-ahead, 7 with one update)
        assert len(seen) == (7 if lookahead_lr else 5) and set(seen) == {precision}, seen
    if CUDA.type != "cuda":
        pytest.skip("TF32 exists on CUDA only (the trainer refuses it elsewhere)")
    (r_ieee, u_ieee), (r_tf32, u_tf32) = runs["ieee"], runs["tf32"]
    assert r_tf32["L_sd"] == pytest.approx(r_ieee["L_sd"], abs=1e-2)
    similarity = torch.nn.functional.cosine_similarity(u_tf32, u_ieee, dim=0).item()
    print(f"tf32 vs ieee SEAM update at eps=1e-2 (lookahead_lr={lookahead_lr}): cosine {similarity:.4f}")
    assert similarity > 0.9


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_lookahead_step_on_cuda_agrees_with_cpu_and_puts_theta_back_bit_exactly(tokenizer, streams, tmp_path,
                                                                               weight):
    """The look-ahead coupling moves the GPU parameters to θ' and back: θ is bit-identical after the step, the step
    equals the CPU one (float32), and under bf16 autocast the look-ahead point and cos at θ' are the float32 ones
    (sign(g_a) comes from the float32 coupling gradient). Also with L_sd split between θ and θ'."""
    common = {"beta": 0.5, "lookahead_lr": 1e-2, "lookahead_steps": 2, "lookahead_weight": weight,
              "unlearn_loss": "final_layer"}
    cpu = _trainer(tokenizer, streams, tmp_path / "cpu", **common)
    r_cpu = cpu.compute_update(0)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model(len(tokenizer), seed=5).to(CUDA)
        theta = [p.detach().clone() for p in model.parameters()]
        tr = _trainer(tokenizer, streams, tmp_path / dtype, model=model, compute_dtype=dtype, **common)
        assert tr.total.device.type == CUDA.type
        row = tr.compute_update(0)
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta, strict=True)), dtype
        assert row["ce_harmful_lookahead"] < row["ce_harmful"], row  # the simulated attacker descended on H
        runs[dtype] = (row, tr.total.clone())
    (r32, u32), (r16, u16) = runs["float32"], runs["bfloat16"]
    print("cos_lookahead cpu / cuda fp32 / cuda bf16:", r_cpu["cos_lookahead"], r32["cos_lookahead"],
          r16["cos_lookahead"])
    assert r32["cos_lookahead"] == pytest.approx(r_cpu["cos_lookahead"], abs=1e-3)
    assert torch.nn.functional.cosine_similarity(u32.cpu(), cpu.total, dim=0) > 0.999
    assert r16["cos_lookahead"] == pytest.approx(r32["cos_lookahead"], abs=1e-3)
    assert r16["ce_harmful_lookahead"] == pytest.approx(r32["ce_harmful_lookahead"], rel=1e-3)
    assert torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.99
    assert r16["L_ul"] != r32["L_ul"]  # autocast did run in bf16
