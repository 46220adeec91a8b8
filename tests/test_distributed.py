"""SEAM under 2 processes (gloo, CPU) through the real launcher: same update as one process on the global batch,
sharded buffers that never hold the full gradient, and resume after a kill."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dist_worker.py")
# The launcher gives each rank one thread; the reference gets the same, so that BLAS sums in the same order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (torchrun, accelerate, seamlm)."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


def _run(out: Path, overrides: dict, procs: int, *extra: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(WORKER), str(out), json.dumps(overrides), *extra]
    if procs > 1:
        cmd = [_bin("torchrun"), "--nproc_per_node", str(procs), "--standalone", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return proc


def _params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "params.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(out, {"gradient_accumulation_steps": 2}, 1)  # 2 micro-batches of 2 = the 2-process global batch
    return out


#: the three ways to run on several processes: replicated buffers, ZeRO-2 buffers, FSDP2 parameters (ZeRO-3)
SHARDING = {"replicated": {}, "sharded": {"shard_gradients": True}, "fsdp": {"shard_parameters": True}}


# compute_dtype bfloat16 takes the other path of the step: g_a in a float32 pass of its own, L_ul and L_up under
# autocast (no retain_graph); its reference is one process with the same setting
MIXED = {"compute_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def single_mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_mixed")
    _run(out, {"gradient_accumulation_steps": 2, **MIXED}, 1)
    return out


# the look-ahead moves θ by sign steps of the global g_a before the coupling: on local shards under FSDP (L_sd
# split between θ and θ', so the coupling is also taken at θ)
LOOKAHEAD = {"lookahead_lr": 1e-3, "lookahead_steps": 2, "lookahead_weight": 0.5}


@pytest.fixture(scope="module")
def single_lookahead(tmp_path_factory):
    out = tmp_path_factory.mktemp("single_lookahead")
    _run(out, {"gradient_accumulation_steps": 2, **LOOKAHEAD}, 1)
    return out


#: FSDP variants checked against one process too: the mixed-precision path, weights read by rank 0 only (the
#: other ranks start from a meta-device skeleton and get their rows by broadcast), and the look-ahead coupling
VARIANTS = {"fsdp-mixed": {**SHARDING["fsdp"], **MIXED}, "fsdp-from-rank0": {**SHARDING["fsdp"], "_meta_init": True},
            "fsdp-lookahead": {**SHARDING["fsdp"], **LOOKAHEAD}}
_REFERENCE = {"fsdp-mixed": "single_mixed", "fsdp-lookahead": "single_lookahead"}


@pytest.mark.parametrize("mode", [*SHARDING, *VARIANTS])
def test_two_processes_give_the_single_process_update(request, tmp_path, mode):
    single = request.getfixturevalue(_REFERENCE.get(mode, "single"))
    _run(tmp_path, SHARDING[mode] if mode in SHARDING else VARIANTS[mode], 2)
    assert _max_diff(_params(single), _params(tmp_path)) < 1e-10
    keys = ("ce_harmful", "ce_benign", "L_up", "cos_g_a_g_b", "norm_g_a", "grad_norm")
    for a, b in zip(_log(single), _log(tmp_path), strict=True):
        for key in keys + (("cos_lookahead", "ce_benign_lookahead", "L_sd") if mode == "fsdp-lookahead" else ()):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    numel = ranks[0]["numel"]
    for info in ranks:
        assert info["world"] == 2 and info["numel"] == numel
        held = info["buffers"]["total"]
        assert set(info["buffers"].values()) == {held}
        assert sum(info["optimizer_state_numel"]) == 2 * held  # AdamW: exp_avg and exp_avg_sq
    if mode == "replicated":
        assert all(info["buffers"]["total"] == info["param_numel_held"] == numel for info in ranks)
        return
    # no rank ever holds a full-length gradient buffer or full optimizer state; together they hold each element once
    assert all(info["buffers"]["total"] < numel for info in ranks)
    if mode == "sharded":
        assert [info["buffers"]["total"] for info in ranks] == [-(-numel // 2)] * 2
        assert all(info["param_numel_held"] == numel for info in ranks)  # ZeRO-2: weights replicated
    else:  # FSDP: each rank holds its rows of every parameter and nothing else
        assert sum(info["buffers"]["total"] for info in ranks) == numel
        assert all(info["param_numel_held"] == info["buffers"]["total"] for info in ranks)


def test_a_meta_skeleton_unlike_rank_0s_model_is_a_clear_error(tmp_path):
    """Untied weights on one rank would make FSDP's collectives mismatch, which gloo/NCCL answer with an abort:
    the layouts are compared first."""
    proc = _run(tmp_path, {**VARIANTS["fsdp-from-rank0"], "_meta_untied": True}, 2, expect_rc=1)
    assert "does not have rank 0's parameters" in proc.stderr


def test_fsdp_run_writes_a_whole_model_loadable_without_seamlm(single, tmp_path):
    from transformers import AutoModelForCausalLM

    _run(tmp_path, {"shard_parameters": True}, 2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float64)
    assert _max_diff(_params(single), dict(model.named_parameters())) < 1e-10


@pytest.mark.parametrize("mode", SHARDING)
def test_two_process_run_resumes_after_a_kill(tmp_path, mode):
    cfg = {"steps": 4, "checkpoint_every": 2, **SHARDING[mode]}
    whole = tmp_path / "whole"
    _run(whole, cfg, 2)
    killed = tmp_path / "killed"
    _run(killed, cfg, 2, "3", expect_rc=1)  # both ranks die after step 3; the last checkpoint is step 2
    ckpt = killed / "run" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.pt", "rank-00000.pt", "rank-00001.pt"]
    if mode == "fsdp":  # the weights are stored as each rank's rows, never gathered
        assert "model" not in torch.load(ckpt / "checkpoint.pt", weights_only=False)
        rows = [torch.load(ckpt / f"rank-0000{r}.pt", weights_only=False)["model_shard"] for r in range(2)]
        assert sum(t.numel() for shard in rows for t in shard.values()) == sum(t.numel() for t in _params(whole).values())
    _run(killed, cfg, 2, "--resume")
    assert _max_diff(_params(whole), _params(killed)) < 1e-10
    assert [r["step"] for r in _log(killed)] == [1, 2, 3, 4]
    for a, b in zip(_log(whole), _log(killed), strict=True):
        assert b["cos_g_a_g_b"] == pytest.approx(a["cos_g_a_g_b"], rel=1e-9)
    # a checkpoint of 2 processes cannot be resumed by 1: a clear error, not a silent mix
    shutil.rmtree(killed / "run" / "model")  # (as if the run had died again after step 2; a finished one is not resumed)
    with pytest.raises(AssertionError, match="written by 2 process"):
        _run(killed, cfg, 1, "--resume")


def test_a_checkpoint_failing_on_one_rank_stops_every_rank_and_keeps_the_last_one(tmp_path):
    """Rank 1's part of the step-4 checkpoint hits a full disk: both ranks stop with the checkpoint error (none
    hangs at a barrier), the step-2 checkpoint stays whole, and the run resumes from it. The replicated optimizer
    state is stored once, by rank 0."""
    proc = _run(tmp_path, {"steps": 6, "checkpoint_every": 2, "_fail_rank_save_at": [1, 4]}, 2, expect_rc=1)
    assert "the disk is full" in proc.stderr and "failed on another rank" in proc.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]
    assert "optimizer" not in torch.load(ckpts / "step-0000002" / "rank-00001.pt", weights_only=False)
    assert "optimizer" in torch.load(ckpts / "step-0000002" / "checkpoint.pt", weights_only=False)
    # a copy whose rank-1 part is cut short: both ranks stop with the error on resume (rank 0 would wait at the
    # barrier after loading otherwise), the original resumes
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "run", broken / "run")
    part = broken / "run" / "checkpoints" / "step-0000002" / "rank-00001.pt"
    part.write_bytes(part.read_bytes()[:100])
    proc = _run(broken, {"steps": 6, "checkpoint_every": 2}, 2, "--resume", expect_rc=1)
    assert "rank-00001.pt" in proc.stderr or "unreadable" in proc.stderr
    assert "another process could not read the checkpoint" in proc.stderr
    _run(tmp_path, {"steps": 6, "checkpoint_every": 2}, 2, "--resume")
    assert [r["step"] for r in _log(tmp_path)] == list(range(1, 7))


@pytest.mark.parametrize("option", ["shard_gradients", "shard_parameters"])
def test_defend_cli_runs_unchanged_under_accelerate_launch(tiny_model_dir, data_files, tmp_path, option):
    config = Path(__file__).parents[1] / "examples" / "accelerate" / "cpu_2proc.yaml"
    out = tmp_path / "out"
    cmd = [_bin("accelerate"), "launch", "--config_file", str(config), "--main_process_port", "0", _bin("seamlm"), "defend",
           "--model", str(tiny_model_dir), "--out", str(out), "--steps", "2", "--batch_size", "2",
           "--max_length", "48", "--beta", "1", f"--{option}", "true", "--checkpoint_every", "1",
           *[a for k in ("harmful", "refusal", "benign") for a in (f"--{k}", str(data_files[k]))]]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    half = -(-info["num_trainable_params"] // 2)
    assert info["world_size"] == 2
    if option == "shard_gradients":
        assert info["gradient_buffer_numel_per_rank"] == half
    else:  # FSDP splits each parameter's rows: rank 0 holds about half (a row more for each odd-sized tensor)
        assert half <= info["gradient_buffer_numel_per_rank"] < info["num_trainable_params"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert (out / "model" / "model.safetensors").is_file()
    assert proc.stdout.count("seam model written to") == 1  # rank 0 reports, not every rank


@pytest.mark.parametrize("optimizer,sharded", [("adamw", False), ("sgd", False), ("adamw", True)],
                         ids=["adamw", "sgd", "adamw-fsdp-clipped"])
def test_data_parallel_finetune_gives_the_single_process_model(tmp_path, optimizer, sharded):
    # batch 5 over 2 ranks: 3 + 2 examples of different lengths; the token-weighted all-reduce (FSDP: the
    # token-weighted loss and its reduce-scatter) must still give the one-process answer-token mean. The FSDP case
    # also clips (a global norm over sharded gradients) and gathers the trained model on rank 0.
    cfg = {"_mode": "finetune", "optimizer": optimizer, **({"max_grad_norm": 0.5} if sharded else {})}
    _run(tmp_path / "one", cfg, 1)
    _run(tmp_path / "two", {**cfg, "shard_parameters": sharded}, 2)
    held = json.loads((tmp_path / "two" / "rank1.json").read_text())
    assert (held["held"] < held["numel"]) == sharded  # rank 1 trained on its rows only
    assert _max_diff(_params(tmp_path / "one"), _params(tmp_path / "two")) < 1e-10
    one, two = ([json.loads(x)["loss"] for x in (tmp_path / d / "loss.jsonl").read_text().splitlines()]
                for d in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-12)


def test_refusal_sft_rank_arriving_late_does_not_take_rank_0s_log_for_an_earlier_run(tmp_path):
    # rank 1 checks the output folder after rank 0 has started writing log.jsonl there: only rank 0 may judge it
    _run(tmp_path, {"_mode": "refusal_sft", "_late": 4}, 2)
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    # and a folder holding a finished run is refused on every rank, none left waiting
    proc = _run(tmp_path, {"_mode": "refusal_sft"}, 2, expect_rc=1)
    assert proc.stderr.count("holds a finished model already") >= 2


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "fsdp"])
def test_attack_cli_under_torchrun_evaluates_once(tiny_model_dir, tmp_path, sharded):
    """Rank 0 evaluates and writes each cell once; with --shard_parameters (an execution setting) the cell keys are
    the same as without."""
    from tests.test_cli import TINY_EVAL

    out = tmp_path / "att"
    cmd = [_bin("torchrun"), "--standalone", "--nproc_per_node", "2", _bin("seamlm"), "attack", "--model", str(tiny_model_dir),
           "--label", "tiny", "--out", str(out), "--learning_rates", "1e-4,1e-3", "--num_samples", "4",
           "--batch_size", "2", "--shard_parameters", str(sharded).lower(), *TINY_EVAL,
           *([] if sharded else ["--eval.trajectory_every", "1"])]  # rank 0 probes while rank 1 waits
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    cells = [r["cell"] for r in rows if r["metric"] == "hs"]
    assert sorted(cells) == ["pre", "sft-full-adamw-lr0.0001-n4-ep1-b2-s0", "sft-full-adamw-lr0.001-n4-ep1-b2-s0"]
    losses = (out / "attacks" / "tiny" / "sft-full-adamw-lr0.001-n4-ep1-b2-s0" / "loss.jsonl").read_text().splitlines()
    assert len(losses) == 2  # 4 samples / batch 2, logged once (by rank 0)
    if not sharded:
        probes = (out / "attacks" / "tiny" / "sft-full-adamw-lr0.001-n4-ep1-b2-s0" / "loss.probe.jsonl").read_text()
        assert [json.loads(x)["updates"] for x in probes.splitlines()] == [0, 1, 2]


def test_a_model_rank_0_cannot_load_stops_every_rank(tiny_model_dir, data_files, tmp_path):
    """Under --shard_parameters only rank 0 reads the weights: its load error (here a cut-short weights file; a
    path that does not exist fails on every rank before any loading) reaches the other ranks, which would otherwise
    wait for the weights forever, and every rank exits with the message."""
    broken = tmp_path / "no-such-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:1000])
    cmd = [_bin("torchrun"), "--standalone", "--nproc_per_node", "2", _bin("seamlm"), "defend", "--model",
           str(broken), "--out", str(tmp_path / "out"), "--shard_parameters", "true",
           *[a for k in ("harmful", "refusal", "benign") for a in (f"--{k}", str(data_files[k]))]]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr  # the two ranks write it at once: their lines may run into each other
    assert err.count("seamlm defend: error: ") == 2, err[-3000:]  # one clean message per rank, no traceback instead
    own = re.search(r"rank 0 could not load the model: (.*?)(?=seamlm defend: error: |\n)", err).group(1)
    assert "could not load model" in own and "no-such-model" in own  # rank 1 relays rank 0's error, naming the model
    assert f"seamlm defend: error: {own}" in err  # and rank 0 says the same itself
