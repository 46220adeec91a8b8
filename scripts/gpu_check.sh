#!/usr/bin/env bash
# The GPU checks in one go (a CUDA machine with torch, transformers, accelerate and peft installed; nothing is
# downloaded): the CUDA tests, then the SEAM-vs-SFT step cost in bf16 autocast on two model sizes.
#   scripts/gpu_check.sh [OUT_DIR]      # logs and JSON land in OUT_DIR (default runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
"$py" -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)" | tee -a "$out/device.txt"
rc=0
"$py" -m pytest -q -m gpu -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.log" || rc=1
for arch in smollm2-135m smollm2-1.7b; do
  "$py" benchmarks/step_cost.py --device cuda --model "random:$arch" --batch-size 8 --max-length 256 --warmup 2 \
    --repeats 10 --modes sft seam-final_layer seam-logit_lens --json "$out/step_cost_$arch.json" \
    2>&1 | tee "$out/step_cost_$arch.md" || rc=1
done
exit $rc
