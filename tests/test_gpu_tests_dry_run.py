"""CI has no GPU, so the ``gpu``-marked tests skip there and could rot unseen (one did: it patched a function
that had been moved). Their logic runs here on the CPU, in a subprocess, as ``SEAMLM_GPU_TESTS_DEVICE=cpu``."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_tests_pass_as_a_cpu_dry_run():
    env = {**os.environ, "SEAMLM_GPU_TESTS_DEVICE": "cpu", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|error)", summary)}
    # only the TF32 half of the TF32 test (two parametrisations) is CUDA-only; everything else must have run
    assert counts.get("passed", 0) >= 6 and counts.get("skipped", 0) <= 2, summary
