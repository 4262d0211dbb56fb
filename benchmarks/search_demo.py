"""examples/search_videos.py on the synthetic world: every caption of the bank as a query over the 72 clips of
`examples/train_videos.py --samples 72` (one right clip per query), how often the right clip comes first by the dual-stream
ranking alone and after the re-rank of the top K, what the wrong first clips differ in, and the time per embedded
clip and per query.

    python benchmarks/search_demo.py out/tiny/ckpt.pt
"""

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import search_videos as sv  # noqa: E402
import train_tiny as tt  # noqa: E402
import train_videos as tv  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="allinone-search-"))
    with contextlib.redirect_stdout(io.StringIO()):
        tv.main(["--samples", "72", "--out", str(folder)])
    clips = folder / "clips"
    model, text, preprocess, untrained = tv.load_model(args.ckpt)
    key = sv.cache_key(args.ckpt, model.cfg, preprocess)
    start = time.perf_counter()
    sv.embed_folder(model, preprocess, clips, sv.find_videos(clips), key)
    embed_s = time.perf_counter() - start
    queries = [tt.caption_text(i) for i in range(len(tt.CAPTIONS))]
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        results = sv.search(model, text, preprocess, untrained, clips, queries, args.top, key)
    query_s = (time.perf_counter() - start) / len(queries)
    right = [f"clip{i:05d}.mp4" for i in range(len(queries))]  # clip k has caption k
    dual = sum(max(found, key=lambda r: r[1])[0].endswith(r) for found, r in zip(results, right)) / len(queries)
    rerank = sum(found[0][0].endswith(r) for found, r in zip(results, right)) / len(queries)
    print(f"{len(queries)} queries over 72 clips: right clip first {dual:.3f} by the dual-stream ranking alone, "
          f"{rerank:.3f} after re-ranking the top {args.top} with the joint pass")
    wrong = Counter()  # what the clip put first after the re-rank differs in, where it is not the right one
    for i, found in enumerate(results):
        first = int(Path(found[0][0]).stem[len("clip"):]) % len(tt.CAPTIONS)
        if first != i:
            wrong[" and ".join(k for k, a, b in zip(("colour", "shape", "motion"), tt.CAPTIONS[i], tt.CAPTIONS[first])
                               if a != b)] += 1
    print("after the re-rank, the clip first differs from the right one in: "
          + (", ".join(f"{what} {n}" for what, n in wrong.most_common()) or "nothing"))
    print(f"embedding: {embed_s / 72 * 1000:.1f} ms per clip; a query (text pass, ranking, {args.top} joint passes "
          f"with decoding): {query_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
