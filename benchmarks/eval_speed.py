"""Speed of evaluation on the CPU: the unimodal passes that retrieval runs over a held-out set, in one run.

    python benchmarks/eval_speed.py                  # tiny and base, 3 frames, 224 px, text length 40
    python benchmarks/eval_speed.py --ckpt out/tiny/ckpt.pt    # what the frame-order test adds to an evaluation

For each preset: clips/s of the video-only pass (normalising uint8 frames included, as evaluate() does) and
captions/s of the text-only pass, at the batch sizes given; and the memory a held-out set of 1,000 clips takes
(uint8 frames, as train_tiny.py keeps them) against float32. With --ckpt: the time of train_tiny.py's evaluation of a
synthetic pre-training checkpoint on its held-out set, and of the frame-order test inside it (order_flip and
vtm_acc_temporal_shuffled), three times each.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from allinone import AllInOne, Config  # noqa: E402
import train_tiny as tt  # noqa: E402
import train_videos as tv  # noqa: E402
from train_tiny import normalize  # noqa: E402


def rate(fn, n, min_time):
    fn()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < min_time:
        fn()
        runs += 1
    return n * runs / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--clips", type=int, default=32, help="clips per video-only batch")
    p.add_argument("--captions", type=int, default=256, help="captions per text-only batch")
    p.add_argument("--min-time", type=float, default=10.0)
    p.add_argument("--ckpt", default="", help="time the evaluation of this synthetic checkpoint instead")
    args = p.parse_args()
    if args.ckpt:
        return order_test_cost(args.ckpt)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 3 frames of 224 px, text length 40")
    print(f"{'preset':8}{'video-only clips/s':>20}{'text-only captions/s':>22}")
    for preset in args.presets:
        torch.manual_seed(0)
        model = AllInOne(Config.preset(preset)).eval()
        video = torch.randint(0, 256, (args.clips, 3, 3, 224, 224), dtype=torch.uint8)
        ids = torch.randint(1000, 30522, (args.captions, 40))
        mask = torch.ones_like(ids)
        mask[:, 20:] = 0  # captions of 20 tokens, padded to 40
        with torch.inference_mode():
            clips = rate(lambda: model.encode_video(normalize(video, "official")), args.clips, args.min_time)
            captions = rate(lambda: model.encode_text(ids, mask), args.captions, args.min_time)
        print(f"{preset:8}{clips:>20.2f}{captions:>22.1f}")
    held = torch.empty(1000, 3, 3, 224, 224, dtype=torch.uint8)
    print(f"held-out frames of 1,000 clips: {held.nbytes / 1e9:.2f} GB as uint8 ({held.nbytes * 4 / 1e9:.2f} GB as float32)")


def order_test_cost(ckpt):
    """Seconds of evaluate() on the checkpoint's held-out set, and of the frame-order test inside it."""
    model, tokens, preprocess, untrained = tv.load_model(ckpt)
    opts = tt.parse_options(["--eval-only", "--init", ckpt])
    held = tt.Synthetic(opts).prepare(opts, model.cfg, tokens, preprocess, [], torch.device("cpu")).held_out()
    order_test, spent = tt.order_test, []

    def timed_order_test(*args):
        start = time.perf_counter()
        out = order_test(*args)
        spent.append(time.perf_counter() - start)
        return out

    tt.order_test = timed_order_test
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(held.video)} held-out clips of {ckpt}")
    for _ in range(3):
        start = time.perf_counter()
        tt.evaluate(model, held, tokens, torch.autocast("cpu", enabled=False), preprocess, untrained)
        total = time.perf_counter() - start
        print(f"evaluation {total:.2f} s, of which the frame-order test {spent[-1]:.2f} s ({spent[-1] / total:.0%})")


if __name__ == "__main__":
    main()
