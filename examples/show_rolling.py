"""See what temporal token rolling does: where tokens travel between frames, where a caption's words look, and how
much of each frame's attention lands on the others. Writes OUT/rolling.png and prints the numbers it drew.

    python examples/show_rolling.py out/tiny/ckpt.pt out/none/ckpt.pt --out out/rolling     # the synthetic world
    python examples/show_rolling.py all-in-one-base.ckpt --vocab vocab.txt --video clip.mp4 --caption "a dog runs" \\
        --word runs --out out/rolling                                                         # any checkpoint, a video

One column per checkpoint, side by side. In each, top to bottom:
  1. where tokens travel: one grid per block (frames down, token slots across, the video [CLS] first), each slot
     coloured by the frame its token started in (frame 0 red, 1 green, 2 blue, 3 yellow, ...);
  2. what each frame attends to: one t x t square per block, row i the share of frame i's video tokens' attention
     that lands on tokens that started in frame j (white = all of it);
  3. where a word looks: for each clip a row per word (the time word, then the colour word), each block's frames
     left to right, the word's attention over the patches in red, every token drawn in the frame it started in.
The attention is the model's own: recomputed from the q, k and mask each block's attention call uses.
"""

import argparse
import contextlib
import math
from pathlib import Path

import torch
from einops import rearrange

import train_videos as tv  # the companion, beside this file: decoding, loading a model
from allinone import token_origins

tt = tv.tt  # train_tiny.py

PALETTE = torch.tensor([[230, 60, 60], [60, 190, 80], [70, 110, 240], [240, 210, 40], [200, 90, 220], [60, 200, 210],
                        [240, 140, 40], [150, 150, 150]], dtype=torch.uint8)


@contextlib.contextmanager
def recorded_attention(model):
    """Collects each block's attention weights, (sequences, heads, queries, keys), computed from the same q, k and key
    mask as its F.scaled_dot_product_attention call (a forward pre-hook on each block's Attention)."""
    weights = []

    def hook(attn, args):
        x, mask = args[0], args[1] if len(args) > 1 else None
        q, k, _ = rearrange(attn.qkv(x), "b s (k h e) -> k b h s e", k=3, h=attn.heads)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        weights.append((scores if mask is None else scores.masked_fill(~mask, -math.inf)).softmax(-1).float().cpu())

    hooks = [block.attn.register_forward_pre_hook(hook) for block in model.blocks]
    try:
        yield weights
    finally:
        for h in hooks:
            h.remove()


def synthetic_clips(cfg, tokens, seed=0):
    """One new synthetic clip per motion, and for each the positions of its time word and its colour word."""
    g = torch.Generator().manual_seed(seed)
    captions = [tt.CAPTIONS.index((c, s, m)) for m, (c, s) in zip(tt.MOTIONS, zip(*[
        [list(tt.COLOURS)[int(i)] for i in torch.randint(len(tt.COLOURS), (6,), generator=g)],
        [list(tt.SHAPES)[int(i)] for i in torch.randint(len(tt.SHAPES), (6,), generator=g)]]))]
    video = (tt.render(captions, cfg.frames, cfg.image_size, g) * 255).round().to(torch.uint8)
    texts = [tt.caption_text(c) for c in captions]
    return video, texts, [[("time", t.split()[-1]), ("colour", t.split()[1])] for t in texts]


def word_position(tokens, caption, word):
    words = tokens.tok.encode(caption).tokens
    pieces = tokens.tok.encode(word, add_special_tokens=False).tokens
    for i in range(len(words)):
        if words[i: i + len(pieces)] == pieces:
            return i
    raise tt.BadInput(f"--word {word!r} is not in the caption {caption!r} (its tokens: {' '.join(words)})")


def rolled_slots(t, n, fold_div):
    """(t, n): True on the slots that rolling fills from another frame before block 0, whatever the model's temporal
    mode (for `none`, the same slots, as a baseline)."""
    return token_origins(t, n, fold_div, 1)[0] != torch.arange(t)[:, None]


def analyse(model, tokens, preprocess, video, captions, words):
    """Per block: origins (t, n), the t x t shares, the words' heat (clips, words, t, n) over the frames their tokens
    started in, and the share of each word's patch attention that lands on travelled tokens, and on the slots rolling
    fills from other frames whatever the mode (clips, words): for none, the share those slots get when nothing moves."""
    cfg, (b, t), n = model.cfg, video.shape[:2], model.cfg.tokens_per_frame
    dev = next(model.parameters()).device
    ids, mask = tokens(captions)
    positions = [[word_position(tokens, c, w) for _, w in ws] for c, ws in zip(captions, words)]
    with torch.no_grad(), recorded_attention(model) as weights:
        model(tt.normalize(video.to(dev), preprocess), ids.to(dev), mask.to(dev))
    if cfg.temporal == "roll":
        origins = token_origins(t, n, cfg.fold_div, cfg.depth)
    else:  # nothing travels
        origins = torch.arange(t)[None, :, None].expand(cfg.depth, t, n)
    l, blocks, rolled = ids.shape[1], [], rolled_slots(t, n, cfg.fold_div)[:, 1:]
    for k, w in enumerate(weights):
        w = w.mean(1)  # over heads
        owner = torch.nn.functional.one_hot(origins[k], t).float()  # (t, n, t): slot -> the frame its token left
        if cfg.temporal == "flatten":  # one sequence [text | frame 0 | frame 1 ...]: frame i's tokens are its queries
            w = rearrange(w[:, :, l:], "b q (j n) -> b q j n", n=n)
            frame_att = torch.stack([w[:, l + i * n: l + (i + 1) * n, :, 1:].sum((1, 3)) for i in range(t)], 1)
            word_att = torch.stack([w[c, positions[c]] for c in range(b)])  # (b, words, t, n)
            heat = word_att
        else:  # one sequence per frame: its queries see the tokens now in its slots, some from other frames
            w = rearrange(w, "(b t) q s -> b t q s", t=t)
            frame_att = torch.einsum("bimn,inj->bij", w[:, :, l:, l + 1:], owner[:, 1:])
            word_att = torch.stack([w[c, :, positions[c], l:].transpose(0, 1) for c in range(b)])  # (b, words, t, n)
            heat = torch.einsum("bpin,inf->bpfn", word_att, owner) / t  # drawn in the frame each token started in
        travelled = (origins[k] != torch.arange(t)[:, None])[:, 1:]
        patch = word_att[..., 1:]
        blocks.append(dict(origins=origins[k], shares=(frame_att / frame_att.sum(-1, keepdim=True)).mean(0), heat=heat,
                           travelled=(patch * travelled).sum((-1, -2)) / patch.sum((-1, -2)),
                           rolled=(patch * rolled).sum((-1, -2)) / patch.sum((-1, -2))))
    return blocks


def draw(video, blocks, zoom):
    """One checkpoint's column (the module docstring): each block a column of its own, t frames wide."""
    (b, t), size, n = video.shape[:2], video.shape[-1] * zoom, blocks[0]["origins"].shape[1]
    width, gap = t * size, 6

    def row(pictures):  # pictures (h, w, 3) uint8 side by side, one per block, each padded to the block's width
        return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, width + gap - x.shape[1], 0, gap), value=40)
                          for x in pictures], 1)

    cell = max(2, width // n)
    rows = [row([PALETTE[blk["origins"] % len(PALETTE)].repeat_interleave(cell, 0).repeat_interleave(cell, 1)
                 for blk in blocks])]  # 1. where tokens travel
    square = width // (2 * t)
    rows.append(row([(blk["shares"] * 255).round().byte()[..., None].expand(t, t, 3).repeat_interleave(square, 0)
                     .repeat_interleave(square, 1) for blk in blocks]))  # 2. what each frame attends to
    frames = rearrange(video, "b t c h w -> b t h w c").repeat_interleave(zoom, 2).repeat_interleave(zoom, 3).float()
    grid = math.isqrt(n - 1)
    for c in range(b):  # 3. where a word looks: bright and red where it looks, dark where it does not
        for word in range(blocks[0]["heat"].shape[1]):
            pictures = []
            for blk in blocks:
                heat = blk["heat"][c, word, :, 1:]
                heat = rearrange(heat / heat.max().clamp(min=1e-9), "t (gh gw) -> t gh gw", gh=grid)
                heat = heat.repeat_interleave(size // grid, 1).repeat_interleave(size // grid, 2)[..., None]
                img = frames[c] * (0.15 + 0.85 * heat) + torch.tensor([110.0, 0, 0]) * heat
                pictures.append(rearrange(img.clamp(0, 255), "t h w c -> h (t w) c").round().byte())
            rows.append(row(pictures))
    return torch.cat(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="train_tiny.py ckpt.pt files, or official checkpoints (with --vocab)")
    p.add_argument("--out", required=True, help="folder for rolling.png")
    p.add_argument("--block", type=int, default=None, help="draw this block only (from 0; default: every block)")
    p.add_argument("--vocab", default="", help="the BERT vocab.txt of official checkpoints")
    p.add_argument("--video", default="", help="a video file (default: synthetic clips, one per motion)")
    p.add_argument("--caption", default="", help="with --video: its caption")
    p.add_argument("--word", default="", help="with --video: the caption's word whose attention is drawn")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu")
    args = p.parse_args(argv)
    if args.video and not (args.caption and args.word):
        p.error("--video needs --caption and --word")
    columns = []
    for path in args.checkpoints:
        model, tokens, preprocess, _ = tv.load_model(path, args.vocab, args.device)
        cfg = model.cfg
        if args.block is not None and not 0 <= args.block < cfg.depth:
            p.error(f"--block {args.block}: {path} has blocks 0 to {cfg.depth - 1}")
        if args.video:
            video = tv.decode_clip(args.video, cfg.frames, cfg.image_size, preprocess=preprocess)[None]
            captions, words = [args.caption], [[("word", args.word)]]
        else:
            video, captions, words = synthetic_clips(cfg, tokens)
        blocks = analyse(model, tokens, preprocess, video, captions, words)
        shown = range(cfg.depth) if args.block is None else [args.block]
        print(f"{path}: temporal {cfg.temporal}, {cfg.frames} frames, {cfg.tokens_per_frame} tokens per frame")
        rolled_share = rolled_slots(cfg.frames, cfg.tokens_per_frame, cfg.fold_div)[:, 1:].float().mean()
        for k in shown:
            blk = blocks[k]
            moved = (blk["origins"] != torch.arange(cfg.frames)[:, None])[:, 1:].float().mean().item()
            kinds = [kind for kind, _ in words[0]]
            print(f"  block {k}: {moved:.0%} of the patch slots hold travelled tokens (away from their frame); a word's "
                  "patch attention on them: "
                  + ", ".join(f"{kind} {blk['travelled'][:, i].mean():.2f}" for i, kind in enumerate(kinds))
                  + f"; on the slots rolling fills ({rolled_share:.0%}): "
                  + ", ".join(f"{kind} {blk['rolled'][:, i].mean():.2f}" for i, kind in enumerate(kinds)))
            print("    frame i's attention on tokens from frame j (rows i): "
                  + " | ".join(" ".join(f"{v:.2f}" for v in row) for row in blk["shares"].tolist()))
        columns.append(draw(video, [blocks[k] for k in shown], zoom=max(1, 128 // cfg.image_size)))
    height = max(c.shape[0] for c in columns)
    img = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, 24, 0, height - c.shape[0]), value=255) for c in columns], 1)
    out = Path(args.out)
    tt.make_folder(out)
    tt.write_file(out / "rolling.png", lambda path: tv.write_image(path, img.numpy()))
    print(f"wrote {out / 'rolling.png'}")


if __name__ == "__main__":
    with tt.one_line_errors():
        main()
