#!/usr/bin/env bash
# The GPU paths and numbers on one GPU, every result in one file (OUT_DIR/results.txt), the most important first:
# short runs of each path a GPU user takes (train, resume on the GPU and on the CPU, fp16 with its loss scaler,
# torchrun with nccl, fine-tuning), the default train_tiny.py run alone, timed, your own videos, --compile, then the
# ablation's three modes side by side and the model benchmark. Each part has its own time limit.
# Needs bash, timeout (coreutils) and Python with the requirements.
#   bash benchmarks/gpu.sh [OUT_DIR]          PYTHON=python3.11 bash benchmarks/gpu.sh   (default: python3)
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
py=${PYTHON:-python3}
results="$out/results.txt"
mkdir -p "$out"
: > "$results"
say() { echo "$@" | tee -a "$results"; }

# part NAME SECONDS COMMAND...: the command's output in OUT/NAME.log; its wall time, exit status and last lines in
# results.txt
part() {
  local name=$1 limit=$2 start status ms
  shift 2
  start=$(date +%s%N)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  status=$?
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  say "$name: $((ms / 1000)).$(printf %03d $((ms % 1000))) s wall, exit $status$([ $status = 124 ] && echo " (over $limit s)")"
  grep -E "^(eval|done|error|wrote)|Error" "$out/$name.log" | tail -n 3 | cut -c 1-400 | sed 's/^/    /' >> "$results"
}

tiny=("$py" train_tiny.py --device cuda --log-every 20)  # (timeout runs programs, not shell functions)
videos=("$py" examples/train_videos.py --device cuda --log-every 20)
say "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -n 1); torch $($py -c 'import torch; print(torch.__version__, torch.version.cuda)')"
part train 120 "${tiny[@]}" --steps 60 --eval-every 60 --eval-clips 128 --out "$out/run" --restart
part resume 120 "${tiny[@]}" --steps 90 --eval-every 30 --eval-clips 128 --out "$out/run" --resume
part resume_on_cpu 120 $py train_tiny.py --device cpu --steps 100 --eval-every 100 --eval-clips 128 --out "$out/run" --resume
part fp16 120 "${tiny[@]}" --precision fp16 --steps 40 --eval-every 40 --eval-clips 128 --out "$out/fp16" --restart
part torchrun_nccl 120 $py -m torch.distributed.run --standalone --nproc_per_node=1 train_tiny.py --device cuda \
  --steps 40 --eval-every 40 --eval-clips 128 --out "$out/torchrun" --restart
part fine_tune_mc 120 "${tiny[@]}" --task mc --init "$out/run/ckpt.pt" --steps 20 --eval-every 20 --out "$out/mc" --restart
part default 600 "${tiny[@]}" --restart --out "$out/default"
part videos_world 120 $py examples/train_videos.py --samples 72 --out "$out/world" --restart
part videos_train 120 "${videos[@]}" --data "$out/world/captions.csv" --val-data "$out/world/mc.jsonl" --workers 2 --steps 20 \
  --eval-every 20 --out "$out/videos" --restart
part compile 300 "${tiny[@]}" --compile --steps 60 --eval-every 60 --eval-clips 128 --out "$out/compile" --restart
for s in 0 1 2; do
  for mode in roll none flatten; do
    OMP_NUM_THREADS=1 timeout 900 $py train_tiny.py --device cuda --restart --out "$out/$mode-s$s" --seed $s \
      --temporal $mode > "$out/$mode-s$s.log" 2>&1 &
  done
done
wait
for f in "$out"/*-s?.log; do  # each run's last evaluation, whatever the default's steps
  last=$(grep "^eval step" "$f" | tail -n 1 | cut -c 1-300)
  say "$f: ${last:-no evaluation (see the log)}"
done
part model_speed_bf16 300 $py benchmarks/model_speed.py --device cuda --dtype bfloat16 --min-time 1
cat "$out/model_speed_bf16.log" >> "$results"
