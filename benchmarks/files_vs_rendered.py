"""The same held-out metrics two ways: on synthetic clips as rendered tensors, and through the files that
`examples/train_videos.py --samples N` writes (lossless MP4, captions.csv, mc.jsonl), decoded by the real-clip path.

    python benchmarks/files_vs_rendered.py out/tiny/ckpt.pt --clips 72     # writes and reads /tmp/allinone-world
"""

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_tiny as tt  # noqa: E402
import train_videos as tv  # noqa: E402

KEYS = ("vtm_acc", "vtm_acc_temporal", "mc_acc", "t2v_r1", "v2t_r1", "t2v_r5", "v2t_r5")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--clips", type=int, default=72)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="allinone-world-"))
    with contextlib.redirect_stdout(io.StringIO()):
        tv.main(["--samples", str(args.clips), "--out", str(folder)])
    model, tokens, preprocess, untrained = tv.load_model(args.ckpt)
    opts = tt.parse_options(["--eval-only", "--init", args.ckpt, "--eval-clips", str(args.clips)])
    data = tt.Synthetic(opts).prepare(opts, model.cfg, tokens, preprocess, [], torch.device("cpu"))
    captions, video = tv.new_clips(model.cfg, args.clips)
    rendered, _ = tt.evaluate(model, data.held_out_of(captions, video, torch.Generator()), tokens, contextlib.nullcontext(),
                              preprocess, untrained)
    files = {}
    for name in ("captions.csv", "mc.jsonl"):
        out = folder / ("eval-" + name)
        with contextlib.redirect_stdout(io.StringIO()):
            files.update(tt.evaluate_only(tt.parse_options(["--eval-only", "--init", args.ckpt, "--val-data",
                                                             str(folder / name), "--eval-clips", str(args.clips),
                                                             "--workers", "0", "--out", str(out)], tv.VideoOptions),
                                          tv.Clips))
    print(f"{args.clips} clips, clip k of caption k mod 72 ({folder})")
    print(f"{'metric':>18} {'rendered':>9} {'files':>9}")
    for k in KEYS:
        print(f"{k:>18} {rendered.get(k, float('nan')):9.3f} {files.get(k, float('nan')):9.3f}")


if __name__ == "__main__":
    main()
