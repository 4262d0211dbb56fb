#!/usr/bin/env bash
# GPU numbers on one GPU, each part under its own time limit, every number in one file (OUT_DIR/results.txt): the
# bf16 model benchmark; the memory table (torch.cuda.max_memory_allocated); the default train_tiny.py run alone, timed,
# with and without --compile, and in each --precision; then three seeds of each temporal mode side by side (so their
# clips/s are a fraction of a lone run's). Needs bash, timeout (coreutils) and Python with the requirements.
#   bash benchmarks/gpu.sh [OUT_DIR]          PYTHON=python3.11 bash benchmarks/gpu.sh   (default: python3)
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
py=${PYTHON:-python3}
results="$out/results.txt"
mkdir -p "$out"
: > "$results"
say() { echo "$@" | tee -a "$results"; }

# part NAME SECONDS COMMAND...: the command's output in OUT/NAME.log, its wall time and exit status in results.txt
part() {
  local name=$1 limit=$2 start status
  shift 2
  start=$(date +%s%N)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  say "$name: $((ms / 1000)).$(printf %03d $((ms % 1000))) s wall, exit $status$([ $status = 124 ] && echo " (over $limit s)")"
}

say "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -n 1); torch $($py -c 'import torch; print(torch.__version__, torch.version.cuda)')"
part model_speed_bf16 600 $py benchmarks/model_speed.py --device cuda --dtype bfloat16 --min-time 2
cat "$out/model_speed_bf16.log" >> "$results"
part memory 900 $py benchmarks/memory.py --device cuda --skip-above 120
cat "$out/memory.log" >> "$results"
for flags in "" "--compile" "--precision fp16" "--precision fp32"; do
  name=default$(echo "$flags" | tr -d ' -')
  part "$name" 1200 $py train_tiny.py --device cuda --restart --out "$out/$name" $flags
  grep -E "^(step  1800|eval step 1800|done)" "$out/$name.log" >> "$results"
done

for s in 0 1 2; do
  for mode in roll none flatten; do
    OMP_NUM_THREADS=1 timeout 2400 $py train_tiny.py --device cuda --restart --out "$out/$mode-s$s" --seed $s \
      --temporal $mode > "$out/$mode-s$s.log" 2>&1 &
  done
done
wait
for f in "$out"/*-s?.log; do say "$f: $(grep "^eval step 1800" "$f" || echo 'no evaluation at step 1800 (see the log)')"; done
