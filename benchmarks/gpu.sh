#!/usr/bin/env bash
# GPU numbers for the README on one GPU: the bf16 model benchmark, then train_tiny.py at its defaults, three seeds of
# each temporal mode, all nine runs sharing the GPU at once (so each run's clips/s is a fraction of what it gets alone).
#   bash benchmarks/gpu.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/model_speed.py --device cuda --dtype bfloat16 --min-time 2 2>&1 | tee "$out/model_speed_bf16.txt"

run() { name=$1; shift; OMP_NUM_THREADS=1 python train_tiny.py --out "$out/$name" "$@" > "$out/$name.log" 2>&1 & }
for s in 0 1 2; do
  for mode in roll none flatten; do
    run $mode-s$s --seed $s --temporal $mode
  done
done
wait
for f in "$out"/*.log; do echo "$f"; grep "^eval step 1800" "$f"; done
