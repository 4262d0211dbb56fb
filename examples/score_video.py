"""Score captions for one video: prints them from the best match to the worst, each with its VTM "match" logit.

    python examples/score_video.py video.mp4 "a man plays the guitar" "a dog runs on a beach" --ckpt out/tiny/ckpt.pt
    python examples/score_video.py video.mp4 "a man plays the guitar" --ckpt all-in-one-base.ckpt --vocab vocab.txt

A train_tiny.py checkpoint brings its tokenizer and frame preprocessing; an official one needs its BERT vocab.txt and
gets the official preprocessing. Frames are sampled as in evaluation: the middle of each of t equal segments.
"""

import argparse
import sys

import torch

import train_videos as tv  # the companion, beside this file: decoding, loading a model

tt = tv.tt  # train_tiny.py


def scores(model, tokens, preprocess, video, captions):
    """The VTM match logit of each caption with the video file: (len(captions),)."""
    dev = next(model.parameters()).device
    clip = tv.load_clip(video, model.cfg.frames, model.cfg.image_size, preprocess=preprocess).to(dev)  # (t, 3, H, W)
    ids, mask = tokens(captions, dev)
    with torch.no_grad():
        return model.match_score(model(clip.expand(len(captions), -1, -1, -1, -1), ids, mask).pooled).cpu()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="a video file (or an image)")
    p.add_argument("captions", nargs="+", help="the captions to score")
    p.add_argument("--ckpt", required=True, help="a train_tiny.py ckpt.pt, or an official checkpoint (with --vocab)")
    p.add_argument("--vocab", default="", help="the BERT vocab.txt of an official checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto: cuda, then mps, then cpu")
    args = p.parse_args(argv)
    model, tokens, preprocess, untrained = tv.load_model(args.ckpt, args.vocab, args.device)
    if "vtm_head" in untrained:
        print(f"note: {args.ckpt} has a VTM head that was never trained: these scores mean nothing", file=sys.stderr)
    for score, caption in sorted(zip(scores(model, tokens, preprocess, args.video, args.captions).tolist(), args.captions),
                                 reverse=True):
        print(f"{score:7.2f}  {caption}")


if __name__ == "__main__":
    with tt.one_line_errors():
        main()
