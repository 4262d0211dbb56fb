"""Speed of allinone.py: clips/s, FLOPs per clip and the share of a large torch.mm's throughput, in one run.

    python benchmarks/model_speed.py                      # tiny and base, batch 2, 3 frames, 224 px, text 40, CPU
    python benchmarks/model_speed.py --presets base --device cuda --dtype bfloat16
    python benchmarks/model_speed.py --presets base --dtype float32 bfloat16     # bf16 against fp32 on the CPU

Eval forward: the joint pass under inference_mode. Training step: an official-style step, a VTM pass (half the pairs
mismatched) and a separate MLM pass (15% masked), backward, AdamW step. FLOPs are counted by torch's FlopCounterMode
(matmuls, convolutions, attention; train_tiny.flop_counter adds the CPU attention kernels it misses). Every throughput is divided by the GFLOP/s of a large square matmul measured in
the same process, before and after (the better reading), so runs on a noisy machine stay comparable.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allinone import AllInOne, Config, mlm_loss, mlm_mask, vtm_batch, vtm_loss  # noqa: E402
from train_tiny import flop_counter  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, min_time, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        sync(device)
        if time.perf_counter() - start >= min_time and runs >= 2:
            return (time.perf_counter() - start) / runs


def count_flops(fn):
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(device, dtype, size, min_time):
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / timed(lambda: a @ b, device, min_time) / 1e9


def bench(preset, args, device, dtype):
    torch.manual_seed(0)
    cfg = Config.preset(preset, frames=args.frames, image_size=args.size, max_text_len=args.text_len)
    model = AllInOne(cfg).to(device)
    b, l = args.batch, args.text_len
    video = torch.rand(b, cfg.frames, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    ids = torch.randint(1000, cfg.vocab_size, (b, l), device=device)
    mask = torch.ones(b, l, dtype=torch.long, device=device)
    mask[:, l * 3 // 4:] = 0  # a quarter of the text is padding, as real captions are
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

    def joint():
        with torch.inference_mode(), autocast:
            model(video, ids, mask)

    def text_only():
        with torch.inference_mode(), autocast:
            model.encode_text(ids, mask)

    def train_step():
        masked, labels = mlm_mask(ids, mask, cfg.vocab_size)
        paired, match = vtm_batch(video)
        with autocast:
            loss = vtm_loss(model.vtm_head(model(paired, ids, mask).pooled), match)
            loss = loss + mlm_loss(model.mlm_head(model(video, masked, mask).text), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = {}
    model.eval()
    for name, fn in (("eval forward", joint), ("text only", text_only)):
        flops = count_flops(fn)
        sec = timed(fn, device, args.min_time)
        rows[name] = (b / sec, flops / b, flops / sec / 1e9)
    model.train()
    flops = count_flops(train_step)
    sec = timed(train_step, device, args.min_time)
    rows["training step"] = (b / sec, flops / b, flops / sec / 1e9)
    params = sum(p.numel() for p in model.parameters())
    title = (f"{preset}: {params / 1e6:.1f}M parameters, batch {b}, {cfg.frames} frames, {cfg.image_size} px, "
             f"text {l}, {device.type} {str(dtype).removeprefix('torch.')}")
    return title, rows


def report(title, rows, peak):
    print(f"\n{title}")
    print(f"{'':16}{'clips/s':>10}{'GFLOP/clip':>12}{'GFLOP/s':>10}{'of mm':>8}")
    for name, (clips, flops, gflops) in rows.items():
        print(f"{name:16}{clips:10.2f}{flops / 1e9:12.2f}{gflops:10.1f}{gflops / peak:8.1%}")
    print(f"text-only encoding is {rows['text only'][0] / rows['eval forward'][0]:.1f}x cheaper in time than the joint "
          f"pass ({rows['eval forward'][1] / rows['text only'][1]:.1f}x in FLOPs)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--text-len", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                   help="one or more: each is measured in the same run, its shares against a matmul of its own dtype")
    p.add_argument("--min-time", type=float, default=5.0, help="seconds to time each measurement")
    args = p.parse_args()
    device = torch.device(args.device)
    mm_size = 4096 if device.type == "cuda" else 2048
    results = {}
    for name in args.dtype:
        dtype = getattr(torch, name)
        before = matmul_gflops(device, dtype, mm_size, args.min_time)
        rows = [bench(preset, args, device, dtype) for preset in args.presets]
        after = matmul_gflops(device, dtype, mm_size, args.min_time)
        peak = max(before, after)  # the machine is shared: the better of the two readings, so shares are not inflated
        print(f"\ntorch.mm {mm_size}x{mm_size} {name} on {device.type} ({torch.get_num_threads()} threads): "
              f"{before:.1f} GFLOP/s before, {after:.1f} after; shares below use {peak:.1f}")
        for title, table in rows:
            report(title, table, peak)
        results[name] = rows
    if len(results) > 1:  # the other dtypes' speed against the first's
        first, *others = results
        for other in others:
            for (title, a), (_, b) in zip(results[first], results[other]):
                print(f"{title.split(':')[0]}: {other} against {first}: " + ", ".join(
                    f"{name} {b[name][0] / a[name][0]:.2f}x" for name in a))


if __name__ == "__main__":
    main()
