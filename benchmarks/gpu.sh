#!/usr/bin/env bash
# GPU numbers on one GPU: the bf16 model benchmark; the memory table (torch.cuda.max_memory_allocated); the default
# train_tiny.py run alone, timed, with and without --compile, and in each --precision; then three seeds of each
# temporal mode side by side (so their clips/s are a fraction of a lone run's).
#   bash benchmarks/gpu.sh [OUT_DIR]
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/model_speed.py --device cuda --dtype bfloat16 --min-time 2 2>&1 | tee "$out/model_speed_bf16.txt"
python benchmarks/memory.py --device cuda --skip-above 120 2>&1 | tee "$out/memory.txt"
for flags in "" "--compile" "--precision fp16" "--precision fp32"; do
  name=default$(echo "$flags" | tr -d ' -')
  /usr/bin/time -f "$name: %e s wall" python train_tiny.py --device cuda --restart --out "$out/$name" $flags \
    > "$out/$name.log" 2>&1
  tail -n 3 "$out/$name.log"
done

run() { name=$1; shift; OMP_NUM_THREADS=1 python train_tiny.py --device cuda --restart --out "$out/$name" "$@" > "$out/$name.log" 2>&1 & }
for s in 0 1 2; do
  for mode in roll none flatten; do
    run $mode-s$s --seed $s --temporal $mode
  done
done
wait
for f in "$out"/*-s?.log; do echo "$f"; grep "^eval step 1800" "$f"; done
