"""Speed of examples/train_videos.py's load_clip, and of training on real clips with 0, 1 and 2 DataLoader workers,
in one run.

    python benchmarks/clip_speed.py            # makes its videos once under /tmp/allinone-bench (about 30 s)

1. A 60-second 854x480 H.264 file at 30 fps with a keyframe every 2 seconds: clips/s of load_clip (seek to the
   keyframe before each wanted frame, decode forward to it) at 3 and 8 frames, 224 px, evaluation sampling, against
   decoding every frame of the file with PyAV and keeping the same frames.
2. examples/train_videos.py (train_tiny.py's loop) on a CSV of 64 rows over eight 10-second 480p clips (nano preset,
   32 px, batch 16): clips/s with --workers 0, 1 and 2, against the synthetic data at the same settings, which costs
   no decoding: the gap is what decoding costs the loop on this machine.
"""

import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_tiny as tt  # noqa: E402
import train_videos as tv  # noqa: E402

W, H, FPS = 854, 480, 30


def make_video(path, seconds, seed=0):
    """A scrolling, wobbling random texture (every frame differs), H.264 with a keyframe every 2 s."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (H // 16 + 4, (W + 2 * FPS * seconds) // 16 + 4, 3), np.uint8).repeat(16, 0).repeat(16, 1)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "x264-params": "keyint=60:min-keyint=60:scenecut=0"})
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for i in range(FPS * seconds):
            y = int(16 + 16 * np.sin(i / 10))
            img = np.ascontiguousarray(tex[y: y + H, 2 * i: 2 * i + W])
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode())


def decode_everything(path, num_frames, size):
    """The naive way: decode every frame, keep the segment middles."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        keep = tv.segment_frames(stream.frames, num_frames)
        picked = {i: f.reformat(width=size, height=size, format="rgb24").to_ndarray()
                  for i, f in enumerate(c.decode(stream)) if i in keep}
    return [picked[i] for i in keep]


def rate(fn, seconds=8):
    fn()
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        fn()
        runs += 1
    return runs / (time.perf_counter() - start)


def main():
    folder = Path(tempfile.gettempdir()) / "allinone-bench"
    folder.mkdir(exist_ok=True)
    long = folder / "60s_480p.mp4"
    if not long.exists():
        make_video(long, 60)
    for i in range(8):
        if not (folder / f"clip{i}.mp4").exists():
            make_video(folder / f"clip{i}.mp4", 10, seed=i)
    print(f"{long}: {long.stat().st_size / 1e6:.1f} MB, 60 s, {W}x{H}, {FPS} fps, keyframe every 2 s")
    print(f"{'frames':>6}{'decode all (clips/s)':>22}{'load_clip (clips/s)':>21}{'speed-up':>10}")
    for t in (3, 8):
        slow = rate(lambda: decode_everything(long, t, 224))
        fast = rate(lambda: tv.load_clip(long, t, 224))
        print(f"{t:>6}{slow:>22.2f}{fast:>21.2f}{fast / slow:>9.1f}x")

    words = ["red", "blue", "small", "large", "fast", "slow", "left", "right"]
    rows = [f"clip{i % 8}.mp4,a {words[i % 8]} texture {words[(i // 8) % 8]}" for i in range(64)]
    (folder / "train.csv").write_text("video,caption\n" + "\n".join(rows) + "\n")
    (folder / "val.csv").write_text("video,caption\nclip0.mp4,a red texture\nclip1.mp4,a blue texture\n")
    common = ["--batch", "16", "--vtm-clips", "8", "--mlm-clips", "4", "--steps", "8", "--log-every", "100",
              "--eval-clips", "2", "--device", "cpu"]
    print(f"\ntraining, nano preset (32 px, 4 frames), batch 16, 8 steps, {torch.get_num_threads()} torch threads")
    synthetic = tt.train(tt.parse_options(common + ["--out", str(folder / "out-synthetic"), "--restart"]))["clips_per_s"]
    print(f"{'synthetic (no decoding)':>26}: {synthetic:6.1f} clips/s")
    for workers in (0, 1, 2):
        last = tt.train(tt.parse_options(common + ["--data", str(folder / "train.csv"), "--val-data", str(folder / "val.csv"),
                                                   "--workers", str(workers), "--out", str(folder / f"out-{workers}"),
                                                   "--restart"], tv.VideoOptions), tv.Clips)
        print(f"{f'real clips, {workers} workers':>26}: {last['clips_per_s']:6.1f} clips/s")


if __name__ == "__main__":
    main()
