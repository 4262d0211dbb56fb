"""Search a folder of videos by text, as All-in-One is used for retrieval: rank every video by the contrastive
similarity of the cheap unimodal passes (text alone against video alone), then re-rank the top K by the joint pass's
match score (VTM).

    python examples/search_videos.py FOLDER "a red circle moves left" "a blue square appears" --ckpt out/tiny/ckpt.pt
    python examples/search_videos.py FOLDER "a dog on a beach" --ckpt all-in-one-base.ckpt --vocab vocab.txt --top 5

Every video (or image) under FOLDER is embedded once by the video-only pass. The embeddings are kept in
FOLDER/.allinone-search.pt (tensors and plain data), keyed by each file's path, size and modification time and by the
checkpoint (its path, size and time), frames, size and preprocessing: a second search embeds only what changed, and
another checkpoint never reuses them. Files that cannot be read are skipped and counted. A checkpoint without
contrastive projections (the released official ones may have none) is searched with the joint pass over every video.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import train_videos as tv  # the companion, beside this file: decoding, loading a model
from allinone import cosine_similarity, load_checkpoint

tt = tv.tt  # train_tiny.py

SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".ts", ".mpg", ".mpeg", ".flv", ".wmv", *tv.IMAGE_SUFFIXES)
CACHE = ".allinone-search.pt"


def find_videos(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise tt.BadInput(f"{folder}: no such folder")
    paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not paths:
        raise tt.BadInput(f"{folder}: no videos in it (files ending in {', '.join(SUFFIXES)})")
    return paths


def cache_key(ckpt, cfg, preprocess):  # what the embeddings depend on, besides the videos themselves
    stat = Path(ckpt).stat()
    return dict(checkpoint=str(Path(ckpt).resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns, frames=cfg.frames,
                image_size=cfg.image_size, preprocess=preprocess)


def embed_folder(model, preprocess, folder, paths, key, batch=16):
    """The video-only embedding of every readable file: (paths kept, (n, dim) embeddings, files embedded now, files
    that failed); unchanged files' embeddings come from the cache, which is then written anew."""
    folder, cfg, dev = Path(folder), model.cfg, next(model.parameters()).device
    stats = {p: (folder / p).stat() for p in paths}
    cached = {}
    try:
        old = load_checkpoint(folder / CACHE) if (folder / CACHE).exists() else {}
        if isinstance(old, dict) and old.get("key") == key:
            cached = {p: (s, m, e) for p, s, m, e in zip(old["paths"], old["sizes"], old["mtimes"], old["embeddings"])}
    except ValueError as e:
        print(f"note: {e}; embedding everything again", file=sys.stderr)
    keep = {p: cached[p][2] for p in paths if p in cached and cached[p][:2] == (stats[p].st_size, stats[p].st_mtime_ns)}
    todo, failed = [p for p in paths if p not in keep], []
    meter = tt.Progress("embedding videos", len(todo), loud=True)
    for start in range(0, len(todo), batch):
        clips, names = [], []
        for p in todo[start: start + batch]:
            try:
                clips.append(tv.load_clip(folder / p, cfg.frames, cfg.image_size, preprocess=preprocess))
                names.append(p)
            except tv.ClipError as e:
                failed.append(str(e))
        if clips:
            with torch.no_grad():
                features = model.video_proj(model.encode_video(torch.stack(clips).to(dev)).video[:, 0]).cpu()
            keep.update(zip(names, features))
        meter(len(todo[start: start + batch]))
    kept = [p for p in paths if p in keep]
    embeddings = torch.stack([keep[p] for p in kept]) if kept else torch.zeros(0, cfg.contrastive_dim)
    cache = dict(key=key, paths=kept, sizes=[stats[p].st_size for p in kept], mtimes=[stats[p].st_mtime_ns for p in kept],
                 embeddings=embeddings)
    try:
        tt.write_file(folder / CACHE, lambda f: torch.save(cache, f))
    except tt.BadInput as e:
        print(f"warning: {e}: the embeddings are not kept for the next search", file=sys.stderr)
    return kept, embeddings, len(todo) - len(failed), failed


def match_scores(model, tokens, preprocess, folder, paths, query):
    """The joint pass of the query with each file: VTM match logits, (len(paths),)."""
    cfg, dev = model.cfg, next(model.parameters()).device
    clips = torch.stack([tv.load_clip(Path(folder) / p, cfg.frames, cfg.image_size, preprocess=preprocess) for p in paths])
    ids, mask = tokens([query] * len(paths), dev)
    with torch.no_grad():
        return model.match_score(model(clips.to(dev), ids, mask).pooled).cpu()


def search(model, tokens, preprocess, untrained, folder, queries, top, key):
    """For each query, its top videos, best first: [(path, contrastive score or None, match score)]."""
    paths = find_videos(folder)
    if untrained & {"text_proj", "video_proj"}:  # no dual stream: the joint pass over every video, for each query
        return joint_search(model, tokens, preprocess, folder, paths, queries, top)
    kept, videos, embedded, failed = embed_folder(model, preprocess, folder, paths, key)
    print(f"{len(kept)} videos: {embedded} embedded now, {len(kept) - embedded} from the cache"
          + (f"; {len(failed)} skipped (could not be read), for example: {failed[0]}" if failed else ""), file=sys.stderr)
    if not kept:
        raise tt.BadInput(f"{folder}: none of its {len(paths)} videos could be read")
    ids, mask = tokens(queries, next(model.parameters()).device)
    with torch.no_grad():
        queries_emb = model.text_proj(model.encode_text(ids, mask).text[:, 0]).cpu()
    sim = cosine_similarity(queries_emb, videos)  # (queries, videos)
    results = []
    for query, row in zip(queries, sim):
        best = row.argsort(descending=True)[:top].tolist()
        match = match_scores(model, tokens, preprocess, folder, [kept[i] for i in best], query)
        rerank = match.argsort(descending=True).tolist()
        results.append([(kept[best[j]], row[best[j]].item(), match[j].item()) for j in rerank])
    return results


def joint_search(model, tokens, preprocess, folder, paths, queries, top, batch=16):
    """Without contrastive projections: every readable video (decoded once, kept as uint8) with each query in a joint
    pass, ranked by the match score."""
    cfg, kept, clips, failed = model.cfg, [], [], []
    for p in paths:
        try:
            clips.append(tv.decode_clip(Path(folder) / p, cfg.frames, cfg.image_size, preprocess=preprocess))
            kept.append(p)
        except tv.ClipError as e:
            failed.append(str(e))
    print(f"note: the checkpoint has no trained contrastive projections: every video is scored with the joint pass, "
          f"{len(kept)} passes for each query, and nothing is cached"
          + (f"; {len(failed)} skipped (could not be read), for example: {failed[0]}" if failed else ""), file=sys.stderr)
    if not kept:
        raise tt.BadInput(f"{folder}: none of its {len(paths)} videos could be read")
    results = []
    for query in queries:
        match = []
        for s in range(0, len(kept), batch):
            dev = next(model.parameters()).device
            video = tt.normalize(torch.stack(clips[s: s + batch]).to(dev), preprocess)
            ids, mask = tokens([query] * len(video), dev)
            with torch.no_grad():
                match.append(model.match_score(model(video, ids, mask).pooled).cpu())
        match = torch.cat(match)
        results.append([(kept[i], None, match[i].item()) for i in match.argsort(descending=True)[:top].tolist()])
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the folder to search (and its subfolders)")
    p.add_argument("queries", nargs="+", help="what to look for, one text each")
    p.add_argument("--ckpt", required=True, help="a train_tiny.py ckpt.pt, or an official checkpoint (with --vocab)")
    p.add_argument("--vocab", default="", help="the BERT vocab.txt of an official checkpoint")
    p.add_argument("--top", type=int, default=10, help="videos to re-rank with the joint pass and print (default 10)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error(f"--top must be at least 1, got {args.top}")
    model, tokens, preprocess, untrained = tv.load_model(args.ckpt, args.vocab, args.device)
    start = time.perf_counter()
    results = search(model, tokens, preprocess, untrained, args.folder, args.queries, args.top,
                     cache_key(args.ckpt, model.cfg, preprocess))
    for query, found in zip(args.queries, results):
        print(f"{query}:")
        for rank, (path, contrastive, match) in enumerate(found, 1):
            print(f"  {rank:2d}. {path}  contrastive {'-' if contrastive is None else f'{contrastive:.3f}'}  "
                  f"match {match:.2f}")
    n = len(args.queries)
    print(f"{n} {'query' if n == 1 else 'queries'} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    with tt.one_line_errors():
        main()
