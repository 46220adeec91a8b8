"""The Hessian-free estimate of ∇cos(g_a, g_b) against the exact gradient (double back-prop, float64)."""

import pytest
import torch

from seamlm.data.format import Formatter, collate
from seamlm.defense.coupling import FlatParams, cosine, hessian_free_cos_grad
from seamlm.defense.losses import answer_ce
from tests.conftest import BENIGN, HARMFUL, make_model


def _batch(tokenizer, examples):
    fmt = Formatter(tokenizer, max_length=64)
    return collate([fmt(e) for e in examples], tokenizer.pad_token_id)


@pytest.fixture
def setup64(tokenizer):
    model = make_model(len(tokenizer), dtype=torch.float64, seed=3)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, _batch(tokenizer, HARMFUL[:3]), _batch(tokenizer, BENIGN[:3])


def _grad_fn(model, flat, batch):
    def fn(buf):
        with flat.grad_sink(buf):
            answer_ce(model, batch).backward()
    return fn


def exact_cos_grad(model, params, bh, bb) -> torch.Tensor:
    g_a = torch.autograd.grad(answer_ce(model, bh), params, create_graph=True)
    g_b = torch.autograd.grad(answer_ce(model, bb), params, create_graph=True)
    va, vb = torch.cat([g.reshape(-1) for g in g_a]), torch.cat([g.reshape(-1) for g in g_b])
    cos = torch.dot(va, vb) / (va.norm() * vb.norm())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(cos, params)]).detach()


def estimate(model, params, bh, bb, eps, precision: str = "ieee", scheme: str = "forward") -> torch.Tensor:
    flat = FlatParams(params)
    g_a, g_b, out = flat.zeros(), flat.zeros(), flat.zeros()
    _grad_fn(model, flat, bh)(g_a)
    _grad_fn(model, flat, bb)(g_b)
    hessian_free_cos_grad(flat, g_a, g_b, _grad_fn(model, flat, bh), _grad_fn(model, flat, bb), eps, out,
                          precision=precision, scheme=scheme)
    return out


def test_grad_sink_accumulates_like_autograd(setup64):
    model, params, bh, bb = setup64
    flat = FlatParams(params)
    buf = flat.zeros()
    _grad_fn(model, flat, bh)(buf)
    _grad_fn(model, flat, bb)(buf)
    ref = [a + b for a, b in zip(torch.autograd.grad(answer_ce(model, bh), params),
                                 torch.autograd.grad(answer_ce(model, bb), params), strict=True)]
    torch.testing.assert_close(buf, torch.cat([g.reshape(-1) for g in ref]))
    assert all(p.grad is None for p in params)


def test_estimate_matches_exact_gradient_and_error_shrinks_linearly(setup64):
    model, params, bh, bb = setup64
    exact = exact_cos_grad(model, params, bh, bb)
    errors = {}
    for eps in (1e-2, 1e-3, 1e-4):
        est = estimate(model, params, bh, bb, eps)
        errors[eps] = ((est - exact).norm() / exact.norm()).item()
    assert errors[1e-4] < 1e-3, errors
    # first-order method: 10x smaller ε → roughly 10x smaller error (allow 4x for curvature noise)
    assert errors[1e-2] / errors[1e-3] > 4, errors
    assert errors[1e-3] / errors[1e-4] > 4, errors


def test_central_differences_shrink_the_error_quadratically(setup64):
    model, params, bh, bb = setup64
    exact = exact_cos_grad(model, params, bh, bb)
    err = {(eps, scheme): ((estimate(model, params, bh, bb, eps, scheme=scheme) - exact).norm() / exact.norm()).item()
           for eps in (1e-1, 1e-2) for scheme in ("forward", "central")}
    # second order: 10x smaller ε → roughly 100x smaller error (allow 30x); far below the forward one at one ε
    assert err[1e-1, "central"] / err[1e-2, "central"] > 30, err
    assert err[1e-2, "central"] < err[1e-2, "forward"] / 10, err
    with pytest.raises(ValueError, match="'forward' or 'central'"):
        estimate(model, params, bh, bb, 1e-2, scheme="backward")


def test_parameters_restored_bit_exactly(setup64):
    model, params, bh, bb = setup64
    before = [p.detach().clone() for p in params]
    estimate(model, params, bh, bb, eps=1e-1)  # a large step makes any sloppy restore visible
    estimate(model, params, bh, bb, eps=1e-1, scheme="central")
    for b, p in zip(before, params, strict=True):
        assert torch.equal(b, p.detach())


def test_parameters_restored_when_the_gradient_function_fails(setup64):
    model, params, bh, bb = setup64
    flat = FlatParams(params)
    before = [p.detach().clone() for p in params]
    g_a, g_b = flat.zeros(), flat.zeros()
    _grad_fn(model, flat, bh)(g_a)
    _grad_fn(model, flat, bb)(g_b)

    def boom(buf):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # raised inside the perturbation, not before it
        hessian_free_cos_grad(flat, g_a, g_b, boom, boom, 1e-2, flat.zeros())
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


def test_cosine_is_global_over_the_flat_vector():
    a = torch.tensor([1.0, 0.0, 3.0, 4.0])
    b = torch.tensor([1.0, 2.0, -3.0, 0.0])
    stats = cosine(a, b)
    assert stats.cos == pytest.approx((1 - 9) / (a.norm() * b.norm()).item())
    assert stats.norm_a == pytest.approx(26 ** 0.5)


def test_flat_params_rejects_low_precision(tokenizer):
    model = make_model(len(tokenizer), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        FlatParams(list(model.parameters()))


def test_gradient_coupling_on_attack_data(tokenizer):
    from seamlm.evaluate.metrics import gradient_coupling
    from tests.conftest import BENIGN, HARMFUL

    model = make_model(len(tokenizer))
    same = gradient_coupling(model, tokenizer, HARMFUL[:4], HARMFUL[:4], batch_size=2, max_length=48)
    assert same["coupling_cos"] == pytest.approx(1.0, abs=1e-5) and same["coupling_slope"] < 0
    other = gradient_coupling(model, tokenizer, HARMFUL[:4], BENIGN[:4], batch_size=2, max_length=48)
    assert -1 <= other["coupling_cos"] < 0.999
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind on the model


def test_gradient_coupling_chunks_weighted_by_answer_tokens(tokenizer):
    """Measured in chunks of 2 rows (the last one shorter, answers of different lengths) the coupling is the one of
    all rows in one batch: chunks weighted by their answer tokens, not averaged (which this test catches)."""
    from seamlm.data.files import Example
    from seamlm.evaluate.metrics import EvalConfig, gradient_coupling
    from tests.conftest import BENIGN, HARMFUL

    # answers 1-4 times as long, so weighting chunks by rows would be wrong as well as averaging them
    harmful, benign = ([Example(e.prompt, " ".join([e.response] * k)) for e, k in zip(rows[:5], (1, 3, 1, 4, 2), strict=True)]
                       for rows in (HARMFUL, BENIGN))
    model = make_model(len(tokenizer))
    whole = gradient_coupling(model, tokenizer, harmful, benign, batch_size=5, max_length=128)
    chunked = gradient_coupling(model, tokenizer, harmful, benign, batch_size=2, max_length=128)
    assert chunked["coupling_cos"] == pytest.approx(whole["coupling_cos"], abs=1e-5)
    assert chunked["coupling_slope"] == pytest.approx(whole["coupling_slope"], rel=1e-4)
    # a figure taken in several chunks names its weighting in the cell's settings (version-1 cells averaged them)
    assert "coupling_weighting" not in EvalConfig(coupling_examples=8).settings_dict()
    assert EvalConfig(coupling_examples=16).settings_dict()["coupling_weighting"] == "answer_tokens"


_PRECISION_PROBE = """
import sys, torch
from seamlm.defense.coupling import FlatParams, hessian_free_cos_grad
start, precision = sys.argv[1:]
if start == "legacy-high":
    torch.set_float32_matmul_precision("high")
elif start == "allow_tf32":
    torch.backends.cuda.matmul.allow_tf32 = True  # what accelerate does on Ampere+
elif start == "new-tf32":
    torch.backends.cuda.matmul.fp32_precision = "tf32"
elif start == "new-mkldnn-bf16":  # backends set apart with the new API: the legacy getter cannot read them
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
def cublas():  # the legacy flag cuBLAS fp32 paths read: refused when the legacy and new settings contradict
    try:
        return torch._C._get_cublas_allow_tf32()
    except RuntimeError as e:
        return "mixed APIs" if "mix of the legacy and new" in str(e) else str(e)
def read():
    if new_api:
        return (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision, cublas())
    return torch.get_float32_matmul_precision()
before = read()
p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
flat, seen = FlatParams([p]), []
def grad_fn(f):
    def fn(buf):
        seen.append(read())
        with flat.grad_sink(buf):
            f(p).backward()
    return fn
fa, fb = grad_fn(lambda q: (q ** 3).sum()), grad_fn(lambda q: q[0] * q[1] ** 2)
g_a, g_b, out = flat.zeros(), flat.zeros(), flat.zeros()
fa(g_a); fb(g_b); seen.clear()
hessian_free_cos_grad(flat, g_a, g_b, fa, fb, 1e-3, out, precision=precision)
after = read()
legacy_after = torch.get_float32_matmul_precision() if start.startswith("legacy") else "-"
if start == "default":
    torch.backends.fp32_precision = "tf32"  # the process's own later setting must still reach matmuls
    legacy_after = torch.backends.cuda.matmul.fp32_precision if new_api else "-"
print(repr((seen, before == after, legacy_after)))
"""
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.mark.parametrize(("start", "precision", "inside", "legacy_after"), [
    ("legacy-high", "ieee", ("ieee", "ieee", False), "high"),  # TF32 on in the process: off for the differences
    ("allow_tf32", "ieee", ("ieee", "ieee", False), "-"),
    ("new-tf32", "ieee", ("ieee", "ieee", False), "-"),
    ("new-mkldnn-bf16", "ieee", ("ieee", "ieee", False), "-"),  # the legacy getter unreadable: left alone
    ("default", "tf32", ("tf32", "ieee", True), "tf32"),  # asked for TF32: on (CUDA only) for the differences only
])
def test_finite_differences_run_at_the_asked_precision_and_the_setting_is_restored(start, precision, inside,
                                                                                  legacy_after):
    """TF32 (10-bit mantissa) would drown g(θ+εδ) − g(θ) unless asked for. Inside: the asked precision; after:
    every backend's setting exactly as before, and the process's own APIs still work. A subprocess per case, as
    these are process-wide settings."""
    if not _NEW_API:
        pytest.skip("torch < 2.9: only the legacy API, covered by the legacy case's logic")
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PRECISION_PROBE, start, precision], capture_output=True,
                         text=True, check=True)
    seen, restored, got_legacy_after = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert seen == [inside, inside], out.stdout + out.stderr
    assert restored and got_legacy_after == legacy_after, out.stdout + out.stderr


class _TwoRanks:
    """Rank 0 of two, in one process: the all-gather hands back the padded global vector's pieces."""

    rank, world_size, device, distributed = 0, 2, torch.device("cpu"), True

    def __init__(self, padded: torch.Tensor):
        self.padded, self.gathers = padded, 0

    def all_gather_into(self, out, shard):
        c, n, size = shard.storage_offset(), shard.numel(), self.padded.numel() // 2
        for r in range(2):
            out[r * n:(r + 1) * n] = self.padded[r * size + c:r * size + c + n]
        self.gathers += 1
        return out


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 22])
def test_sharded_write_rebuilds_every_parameter_chunk_by_chunk(tokenizer, chunk):
    """ZeRO-2's write gathers ``gather_chunk`` elements per rank at a time (never a full-length vector) and must
    still land every element of both ranks' shards in its parameter, across chunk and parameter boundaries."""
    from seamlm.defense.coupling import ShardedFlatParams

    params = list(make_model(len(tokenizer)).parameters())
    total = sum(p.numel() for p in params)
    padded = torch.randn(2 * -(-total // 2))
    ctx = _TwoRanks(padded)
    flat = ShardedFlatParams(params, ctx)
    flat.gather_chunk = chunk
    flat.write(padded[: flat.shard_size].clone())
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), padded[:total], rtol=0, atol=0)
    assert ctx.gathers == -(-flat.shard_size // min(chunk, flat.shard_size))


def test_the_coupling_of_a_model_under_a_live_lora_adapter_is_the_base_weights(tokenizer):
    """The attack probe measures a LoRA attack mid-way, adapters live: at update 0 (B = 0) its figure must be the
    unattacked model's, i.e. the adapters' own gradients (non-zero for B) stay out of the vector."""
    from peft import LoraConfig, get_peft_model

    from seamlm.evaluate.metrics import gradient_coupling
    from tests.conftest import BENIGN, HARMFUL

    model = make_model(len(tokenizer))
    before = gradient_coupling(model, tokenizer, HARMFUL[:4], BENIGN[:4], batch_size=2, max_length=48)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    live = gradient_coupling(peft_model, tokenizer, HARMFUL[:4], BENIGN[:4], batch_size=2, max_length=48)
    assert live["coupling_cos"] == pytest.approx(before["coupling_cos"], abs=1e-5)
    assert live["coupling_slope"] == pytest.approx(before["coupling_slope"], rel=1e-4)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())  # flags restored


def test_sharded_gradient_sink_ignores_a_gradient_left_on_the_model():
    """ZeRO-2's sink collects each backward's gradient into this rank's shard; a .grad a caller's loop left on the
    parameters (zero_grad(set_to_none=False) leaves zeros, a forgotten one real values) must not be added to it."""
    from seamlm.defense.coupling import FlatParams, ShardedFlatParams

    class Averaging(_TwoRanks):
        def all_reduce_mean_(self, t):  # both ranks computed the same gradient: the mean is this one
            return t

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    sharded = ShardedFlatParams([p], Averaging(torch.zeros(4)))
    p.grad = torch.full_like(p, 100.0)
    buf = sharded.zeros()
    with sharded.grad_sink(buf):
        (p ** 2).sum().backward()
    torch.testing.assert_close(buf, torch.tensor([2.0, 4.0]))  # rank 0's half of 2θ
    p.grad = torch.full_like(p, 100.0)
    plain = FlatParams([p])
    whole = plain.zeros()
    with plain.grad_sink(whole):
        (p ** 2).sum().backward()
    torch.testing.assert_close(whole, 2 * p.detach())
