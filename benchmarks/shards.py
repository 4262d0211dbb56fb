"""WebDataset shards in examples/train_videos.py: the memory of reading them, flat in the samples read, and training
speed from shards against data files, in one run.

    python benchmarks/shards.py memory --sizes 10000 100000     # a fresh process per size
    python benchmarks/shards.py speed --steps 30

Both use the synthetic world's clips (examples/train_videos.py --samples 96: lossless 32 px mp4 clips of 4 frames,
captions.csv, and the same clips as shards of 32), made once under /tmp/allinone-shards.

`memory`: the clips repeated into shards of 1,000 samples (write_shards, video2dataset's layout, 9-digit keys), enough
for the largest size; in a fresh process per size, a ShardStream (process 0 of 1, no DataLoader, nano preset,
preprocess "ours", --buffer samples shuffled among) over the first size / 1,000 shards, read until size samples are
decoded: resident memory (now: /proc/self/statm; peak: getrusage's ru_maxrss) after the imports, after 10% of the
samples and at the end, and samples/s. Flat: the end's figures are the 10% mark's.
`speed`: examples/train_videos.py's training (train_tiny.py's loop; nano preset, batch 16, --vtm-clips 8, --mlm-clips 4,
evaluation of 16 held-out clips at the end only) on the same clips, from shards (all shards but the last for training,
the last held out) and from CSV files of the same clips, with --workers 0, 1 and 2: clips/s (train's clips_per_s,
which leaves out the evaluation) and shards / files for each worker count.
"""

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import train_videos as tv  # noqa: E402

tt = tv.tt
FOLDER, PER_SHARD = Path("/tmp/allinone-shards"), 1000


def world(samples):
    """The synthetic world of `samples` clips (made once): its folder."""
    out = FOLDER / f"world{samples}"
    if not (out / "captions.csv").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "train_videos.py"), "--samples", str(samples), "--out",
                        str(out)], check=True, capture_output=True)
    return out


def rss_mb():  # (now, peak) resident memory in MB
    now = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    return now / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_once(folder, n, buffer):
    """In this process: read n samples from the shards of folder, printing one JSON line."""
    from allinone import Config
    shards = sorted(str(p) for p in Path(folder).glob("*.tar"))[: -(-n // PER_SHARD)]
    stream = tv.ShardStream(shards, Config.preset("nano"), "ours", 0, 0, 0, 1, buffer)
    marks, start = dict(imports=rss_mb()), time.perf_counter()
    for i, (clip, *_) in enumerate(stream, 1):
        if clip is None:
            raise SystemExit("no sample could be loaded")
        if i == n // 10:
            marks["tenth"] = rss_mb()
        if i == n:
            break
    print(json.dumps(dict(marks, end=rss_mb(), per_s=n / (time.perf_counter() - start), shards=len(shards))))


def memory(args):
    rows = list(csv.DictReader(open(world(args.samples) / "captions.csv")))
    clips = [(world(args.samples) / r["video"], r["caption"]) for r in rows]
    big = FOLDER / f"big{args.samples}"
    have = len(list(big.glob("*.tar"))) * PER_SHARD if big.exists() else 0
    if have < max(args.sizes):
        print(f"writing {max(args.sizes):,} samples as shards of {PER_SHARD:,} in {big} ...", flush=True)
        tv.write_shards(big, (clips * (max(args.sizes) // len(clips) + 1))[: max(args.sizes)], per_shard=PER_SHARD)
    print(f"ShardStream, nano preset, --buffer {args.buffer}; resident MB, now / peak")
    print(f"{'samples':>9}{'shards':>8}{'after imports':>16}{'after 10%':>16}{'at the end':>16}{'end - 10%':>11}"
          f"{'samples/s':>11}")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "read-once", "--folder", str(big), "--sizes", str(n), "--buffer",
                              str(args.buffer)], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        r = json.loads(out)
        cells = "".join(f"{f'{r[k][0]:.0f} / {r[k][1]:.0f}':>16}" for k in ("imports", "tenth", "end"))
        print(f"{n:>9,}{r['shards']:>8}{cells}{r['end'][0] - r['tenth'][0]:>+11.1f}{r['per_s']:>11.0f}", flush=True)


def speed(args):
    folder = world(args.samples)
    shards = sorted(p.name for p in (folder / "shards").glob("*.tar"))
    if len(shards) < 3:
        raise SystemExit("--samples: need at least 3 shards of 32 (2 to train with 2 workers, 1 held out): 65 or more")
    rows = (folder / "captions.csv").read_text().splitlines()
    split = 1 + 32 * (len(shards) - 1)  # the header, then the rows of the training shards
    (folder / "train.csv").write_text("\n".join(rows[:split]) + "\n")  # beside captions.csv: the same video paths
    (folder / "val.csv").write_text("\n".join(rows[:1] + rows[split:]) + "\n")
    sources = {"files": (tv.Clips, ["--data", str(folder / "train.csv"), "--val-data", str(folder / "val.csv")]),
               "shards": (tv.Shards, ["--data", f"{folder}/shards/{{{shards[0][:-4]}..{shards[-2][:-4]}}}.tar",
                                      "--val-data", str(folder / "shards" / shards[-1])])}
    s = str(args.steps)
    common = ["--preset", "nano", "--batch", "16", "--vtm-clips", "8", "--mlm-clips", "4", "--steps", s, "--eval-every",
              s, "--log-every", s, "--eval-clips", "16", "--device", "cpu", "--restart"]
    found = {}
    for workers in (0, 1, 2):
        for source, (Data, flags) in sources.items():
            opts = tt.parse_options(common + flags + ["--workers", str(workers), "--out",
                                                      str(FOLDER / f"out-{source}-{workers}")], tv.VideoOptions)
            found[source, workers] = tt.train(opts, Data)["clips_per_s"]
    print(f"\n{len(shards) - 1} training shards of 32 clips ({32 * (len(shards) - 1)} clips, and as files), 1 held out; "
          f"nano preset, batch 16, {args.steps} steps")
    print(f"{'workers':>7}{'files (clips/s)':>17}{'shards (clips/s)':>18}{'shards / files':>16}")
    for w in (0, 1, 2):
        print(f"{w:>7}{found['files', w]:>17.1f}{found['shards', w]:>18.1f}{found['shards', w] / found['files', w]:>15.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "speed", "read-once"])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="memory: samples to read, a process each")
    p.add_argument("--buffer", type=int, default=100, help="memory: the ShardStream's shuffle buffer (samples)")
    p.add_argument("--samples", type=int, default=96, help="clips in the synthetic world (shards of 32)")
    p.add_argument("--steps", type=int, default=30, help="speed: training steps of each run")
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what == "read-once":
        return read_once(args.folder, args.sizes[0], args.buffer)
    (memory if args.what == "memory" else speed)(args)


if __name__ == "__main__":
    main()
