"""Peak memory of one training step (the official kind: a VTM pass over matched and mismatched pairs, a separate MLM
pass, backward, AdamW), by preset, frames, batch and activation checkpointing, each in a fresh process.

    python benchmarks/memory.py                          # CPU: peak resident memory of the process (ru_maxrss)
    python benchmarks/memory.py --device cuda            # GPU: torch.cuda.max_memory_allocated
    python benchmarks/memory.py --presets tiny --frames 3 --batch 8 --skip-above 20

On the CPU the figure is the whole process's peak (weights, optimizer state, activations, the allocator's cache).
A cell whose memory estimate (from the smaller batches of its row, linear in the batch) is above --skip-above GiB, or
whose step-time estimate is above --skip-slower seconds, is not run; the table shows the estimates instead. The time
of the step is the second of two.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allinone import AllInOne, Config, mlm_loss, mlm_mask, vtm_batch, vtm_loss  # noqa: E402


def one_cell(preset, frames, batch, checkpointing, device):
    torch.manual_seed(0)
    dev = torch.device(device)
    model = AllInOne(Config.preset(preset, frames=frames, checkpointing=checkpointing, dropout=0.0)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    cfg = model.cfg
    video = torch.randn(batch, frames, 3, cfg.image_size, cfg.image_size, device=dev)
    ids = torch.randint(1000, cfg.vocab_size, (batch, cfg.max_text_len), device=dev)
    mask = torch.ones_like(ids)
    mask[:, cfg.max_text_len * 3 // 4:] = 0  # a quarter of it padding
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        with autocast:
            paired, labels = vtm_batch(video)
            loss = vtm_loss(model.vtm_head(model(paired, ids, mask).pooled).float(), labels)
            masked, targets = mlm_mask(ids, mask, cfg.vocab_size)
            loss = loss + mlm_loss(model.mlm_head(model(video, masked, mask).text), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(peak_gib=peak / 2**30, step_s=seconds[-1])))


def estimate(seen, batch, proportional=False):
    """Linear in the batch, from the cells measured so far in the row: [(batch, value)]; from one cell, proportional
    to the batch where asked (a step's time), else none (memory has a part that does not grow with the batch)."""
    if not seen or (len(seen) == 1 and not proportional):
        return 0.0
    if len(seen) == 1:
        return seen[0][1] * batch / seen[0][0]
    (b0, v0), (b1, v1) = seen[-2:]
    return v1 + (v1 - v0) / (b1 - b0) * (batch - b1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--frames", type=int, nargs="+", default=[3, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8, 32])  # VTM pairs need 2 clips at least
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-above", type=float, default=20.0, help="GiB: larger estimates are not run")
    p.add_argument("--skip-slower", type=float, default=300.0, help="seconds a step: slower estimates are not run")
    p.add_argument("--cell", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        preset, frames, batch, ckpt = args.cell
        return one_cell(preset, int(frames), int(batch), ckpt == "1", args.device)
    print(f"{'preset':>6} {'frames':>6} {'batch':>5}  {'peak GiB':>9} {'step s':>7}  {'checkpointing: GiB':>19} {'step s':>7}")
    for preset in args.presets:
        for frames in args.frames:
            gib, secs = {0: [], 1: []}, {0: [], 1: []}  # (batch, measured) of this row, for the estimates
            for batch in args.batch:
                cells = []
                for ckpt in (0, 1):
                    need, take = estimate(gib[ckpt], batch), estimate(secs[ckpt], batch, proportional=True)
                    if need > args.skip_above or take > args.skip_slower:
                        cells.append(f"{f'~{need:.1f}' if need else '?':>9} {f'~{take:.0f}':>7}")
                        continue
                    out = subprocess.run([sys.executable, __file__, "--device", args.device, "--cell", preset, str(frames),
                                          str(batch), str(ckpt)], capture_output=True, text=True)
                    if out.returncode:
                        cells.append(f"{'failed':>9} {'-':>7}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    gib[ckpt].append((batch, r["peak_gib"]))
                    secs[ckpt].append((batch, r["step_s"]))
                    cells.append(f"{r['peak_gib']:9.2f} {r['step_s']:7.2f}")
                print(f"{preset:>6} {frames:>6} {batch:>5}  {cells[0]}  {cells[1]:>27}", flush=True)
    print("~: an estimate (linear in the batch from the row's measured cells), not run; ?: not run, no estimate")


if __name__ == "__main__":
    main()
