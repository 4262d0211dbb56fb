#!/usr/bin/env bash
# The GPU numbers in the README, in one go: bf16 model speed (tiny and base), then train_tiny.py's rolling ablation
# (roll, none, flatten at the default budget) for seeds 0, 1 and 2, the three seeds sharing the GPU at once
# (so their clips/s are a third of what one run alone gets).
#   bash benchmarks/gpu.sh [OUT_DIR]
set -u
out=${1:-${OUT:-out/gpu}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
python benchmarks/model_speed.py --device cuda --dtype bfloat16 --min-time 2 2>&1 | tee "$out/model_speed_bf16.txt"
for seed in 0 1 2; do
  OMP_NUM_THREADS=4 python train_tiny.py --ablation --seed "$seed" --out "$out/ablation-seed$seed" \
    > "$out/ablation-seed$seed.log" 2>&1 &
done
wait
for seed in 0 1 2; do echo "seed $seed"; tail -n 4 "$out/ablation-seed$seed.log"; done | tee "$out/ablation.txt"
