#!/usr/bin/env bash
# The GPU numbers in the README, as they were made (one NVIDIA H200): the bf16 model benchmark, then train_tiny.py
# runs at the default budget, three seeds each, in two waves of processes sharing the GPU (so each run's clips/s is
# a fraction of what it gets alone).
#   bash benchmarks/gpu.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/model_speed.py --device cuda --dtype bfloat16 --min-time 2 2>&1 | tee "$out/model_speed_bf16.txt"

run() { name=$1; shift; OMP_NUM_THREADS=1 python train_tiny.py --out "$out/$name" "$@" > "$out/$name.log" 2>&1 & }
for s in 0 1 2; do  # wave 1: 12 runs at once (9 reported)
  run roll-c0.5-s$s --seed $s --curriculum 0.5
  run fold4-s$s --seed $s --curriculum 0.5 --fold-div 4
  run lr1e-3-s$s --seed $s --curriculum 0.5 --lr 1e-3
done
wait
for s in 0 1 2; do  # wave 2: 15 runs at once
  run default-s$s --seed $s
  run curriculum1-s$s --seed $s --curriculum 1.0
  run fold5-s$s --seed $s --curriculum 0.5 --fold-div 5
  run none-s$s --seed $s --curriculum 0.5 --temporal none
  run flatten-s$s --seed $s --curriculum 0.5 --temporal flatten
done
wait
for f in "$out"/*.log; do echo "$f"; grep "^eval step 1800" "$f"; done
