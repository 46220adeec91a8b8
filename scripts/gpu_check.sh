#!/usr/bin/env bash
# The GPU checks in one go (a CUDA machine with torch, transformers, accelerate and peft installed; nothing is
# downloaded): the CUDA tests, the coupling estimate's accuracy by matmul precision and ε, then the SEAM-vs-SFT
# step cost in bf16 autocast on two model sizes, with the coupling at IEEE float32 and at TF32.
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
"$py" benchmarks/coupling_precision.py --device cuda --hidden 256 --layers 4 --batch-size 8 \
  --json "$out/coupling_precision.json" 2>&1 | tee "$out/coupling_precision.md" || rc=1
for arch in smollm2-135m smollm2-1.7b; do
  for prec in ieee tf32; do
    # SFT in every run: each ratio is then measured side by side with its own SFT step
    modes="sft seam-final_layer seam-final_layer+lookahead seam-logit_lens"
    # shellcheck disable=SC2086
    "$py" benchmarks/step_cost.py --device cuda --model "random:$arch" --batch-size 8 --max-length 256 --warmup 2 \
      --repeats 10 --modes $modes --coupling-precision "$prec" --json "$out/step_cost_${arch}_$prec.json" \
      2>&1 | tee "$out/step_cost_${arch}_$prec.md" || rc=1
  done
done
exit $rc
