#!/usr/bin/env bash
# Every check that needs a CUDA device, in one pass, with a time limit on each step:
#   1. tests/gpu: the Triton kernels compiled against their torch references, the engine on CUDA
#      against transformers on the same GPU (float32 token for token, bfloat16 first tokens), and the
#      KV hand-off with CUDA memory on either side (skipped where UCX is not installed);
#   2. `pdserve bench offline` on CUDA in bfloat16: the small preset, then the llama3-8b preset
#      (written in the background meanwhile), each against transformers, with decode steps beside
#      the HBM roofline; then llama3-8b again without CUDA graphs, for the step times side by side.
# Usage: scripts/gpu_check.sh OUT_DIR   (run from the repository root; logs and figures land in OUT_DIR)
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PDSERVE_HOME=/tmp/pdserve-home
py=${PYTHON:-python3}
pdserve=("$py" -m services.cli)
bench=(bench offline --device cuda --num-prompts 64 --input-len 64:512 --output-len 16:256 --seed 0)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"

( timeout 400 "${pdserve[@]}" make-model --preset llama3-8b --out /tmp/llama3-8b --seed 0 \
    > "$out/make_llama3_8b.log" 2>&1; echo "exit $?" >> "$out/make_llama3_8b.log" ) &

echo "== tests/gpu"
timeout 240 "$py" -m pytest -q -p no:cacheprovider tests/gpu > "$out/pytest_gpu.log" 2>&1
echo "exit $?"; tail -n 15 "$out/pytest_gpu.log"

echo "== bench offline, small preset"
timeout 60 "${pdserve[@]}" make-model --preset small --out /tmp/small --seed 0 > /dev/null 2>&1
timeout 180 "${pdserve[@]}" "${bench[@]}" --model /tmp/small > "$out/offline_small.txt" 2>> "$out/stderr.log"
echo "exit $?"; cat "$out/offline_small.txt"; tail -n 3 "$out/stderr.log"

echo "== bench offline, llama3-8b preset"
wait
tail -n 2 "$out/make_llama3_8b.log"
timeout 300 "${pdserve[@]}" "${bench[@]}" --model /tmp/llama3-8b --kv-cache-gib 40 \
    > "$out/offline_llama3_8b.txt" 2>> "$out/stderr.log"
echo "exit $?"; cat "$out/offline_llama3_8b.txt"; tail -n 3 "$out/stderr.log"

echo "== bench offline, llama3-8b preset, eager decode steps"
timeout 150 "${pdserve[@]}" "${bench[@]}" --model /tmp/llama3-8b --kv-cache-gib 40 --enforce-eager --skip-transformers \
    > "$out/offline_llama3_8b_eager.txt" 2>> "$out/stderr.log"
echo "exit $?"; cat "$out/offline_llama3_8b_eager.txt"; tail -n 3 "$out/stderr.log"
