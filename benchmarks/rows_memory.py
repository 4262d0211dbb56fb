"""Memory and time of the data path for big data files: WebVid-style caption CSVs (video, caption, start, end).

    python benchmarks/rows_memory.py read --rows 100000 1000000 2500000     # read_data + Clips set-up, a process each
    python benchmarks/rows_memory.py train --rows 1000000 --steps 300       # PSS of the run and its 2 workers

`read`: in a fresh process per size, the resident memory that reading the file (examples/train_videos.py's read_data)
and setting up the data (its Clips, tokenizer included) leave behind, the peak on the way, and the time. `train`: an
examples/train_videos.py run over such a file whose rows point at a handful of real clips, with --workers 2; the
proportional set size (PSS: shared pages split among the processes that share them, from /proc/PID/smaps_rollup) of
the main process and each worker, sampled every 2 s, the last sample before the run ends. --code DIR measures the
examples/train_videos.py and train_tiny.py in the checkout DIR instead (another version of them).
"""

import argparse
import csv
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
WORDS = ("a man woman dog cat child car boat tree river city street beach park old young red blue green slow motion "
         "aerial view of the in on at with and walking running sitting playing talking looking camera close up shot "
         "sunset night day snow rain water mountain forest field road people group two three small large happy "
         "business office kitchen food cooking table hands smiling").split()


def write_csv(path, rows, videos=None):
    """rows WebVid-style rows: a path of about 30 characters, a caption of about 12 words (about 65 characters)."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["video", "caption", "start", "end"])
        for i in range(rows):
            video = videos[i % len(videos)] if videos else f"videos/{i // 1000:06d}/{1_000_000_000 + i}.mp4"
            out.writerow([video, " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))), "0", "4.5"])


def write_vocab(path):
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    Path(path).write_text("\n".join(specials + sorted(set(WORDS))) + "\n")


def status(field):  # kB from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])


def read_once(code, data, vocab):
    """In this process: the memory and time of read_data + Clips for one file, as one JSON line."""
    sys.path.insert(0, str(Path(code) / "examples"))  # train_videos puts the checkout itself on sys.path
    import torch
    import train_videos as tv
    from allinone import Config
    tt = tv.tt
    opts = tt.parse_options(["--data", data, "--vocab", vocab, "--device", "cpu"], tv.VideoOptions)
    tokens = tt.Tokens(tt.make_tokenizer(vocab, []), 40)
    cfg = Config.preset("nano", vocab_size=tokens.tok.get_vocab_size())
    read_data, marks = tv.read_data, {}

    def timed_read_data(opts):  # Clips reads the data files in its constructor: the read's time and memory, marked,
        rows = read_data(opts)  # and the rows held here, so that kept_mb counts them as before
        marks.update(read_s=time.perf_counter() - start, after_read=status("VmRSS"), rows=rows)
        return rows

    tv.read_data = timed_read_data
    before, start = status("VmRSS"), time.perf_counter()
    tv.Clips(opts).prepare(opts, cfg, tokens, "ours", [], torch.device("cpu"))
    total_s = time.perf_counter() - start
    read_s, after_read = marks["read_s"], marks["after_read"]
    print(json.dumps(dict(read_s=read_s, setup_s=total_s, read_mb=(after_read - before) / 1024,
                          kept_mb=(status("VmRSS") - before) / 1024, peak_mb=(status("VmHWM") - before) / 1024)))


def pss_kb(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None


def children(pid):
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["read", "train", "read-once"])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 2_500_000])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--code", default=str(HERE),
                   help="the checkout whose examples/train_videos.py (and train_tiny.py) to measure")
    p.add_argument("--data", default="")
    p.add_argument("--vocab", default="")
    args = p.parse_args()
    if args.what == "read-once":
        return read_once(args.code, args.data, args.vocab)
    folder = Path(tempfile.mkdtemp(prefix="allinone-rows-"))
    write_vocab(folder / "vocab.txt")
    if args.what == "read":
        for n in args.rows:
            write_csv(folder / f"rows{n}.csv", n)
            size = (folder / f"rows{n}.csv").stat().st_size
            out = subprocess.run([sys.executable, __file__, "read-once", "--code", args.code, "--data",
                                  str(folder / f"rows{n}.csv"), "--vocab", str(folder / "vocab.txt")],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"{n:>9,} rows ({size / n:.0f} bytes a row in the file): read {r['read_s']:.1f} s, with Clips "
                  f"{r['setup_s']:.1f} s; kept {r['kept_mb']:.0f} MB ({r['kept_mb'] * 2**20 / n:.0f} bytes a row), "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)
            (folder / f"rows{n}.csv").unlink()
        return
    sys.path.insert(0, str(HERE / "benchmarks"))
    from clip_speed import make_video
    videos = []
    for i in range(4):
        make_video(folder / f"clip{i}.mp4", 10, seed=i)
        videos.append(f"clip{i}.mp4")
    n = args.rows[0]
    write_csv(folder / "big.csv", n, videos)
    cmd = [sys.executable, str(Path(args.code) / "examples" / "train_videos.py"), "--data", str(folder / "big.csv"),
           "--vocab", str(folder / "vocab.txt"), "--val-data", str(folder / "val.csv"), "--steps", str(args.steps),
           "--batch", "16", "--vtm-clips", "8", "--mlm-clips", "4", "--eval-every", str(args.steps * 10), "--ckpt-every",
           str(args.steps * 10), "--log-every", "50", "--workers", "2", "--out", str(folder / "out"), "--device", "cpu"]
    write_csv(folder / "val.csv", 8, videos)
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    last = {}

    def sample():
        while run.poll() is None:
            now = {"main": pss_kb(run.pid)}
            for i, c in enumerate(children(run.pid)):
                now[f"worker {i}"] = pss_kb(c)
            if len(now) == 3 and all(now.values()):
                last.update(now, at=time.strftime("%H:%M:%S"))
            time.sleep(2)

    threading.Thread(target=sample, daemon=True).start()
    for line in run.stdout:
        if line.startswith("step"):
            print(line.split("|")[0].strip(), flush=True)
    run.wait()
    at = last.pop("at", "?")
    print(f"{n:,} rows, {args.steps} steps, --workers 2: PSS at the last sample ({at}): "
          + ", ".join(f"{k} {v / 1024:.0f} MB" for k, v in last.items()) + f"; in all {sum(last.values()) / 1024:.0f} MB")


if __name__ == "__main__":
    main()
