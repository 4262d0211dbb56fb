"""
Train All-in-One (allinone.py) in minutes: synthetic clips by default, your own videos with --data.

    python train_tiny.py                              # synthetic clips, no files needed; ~8 min on a 2-core CPU
    python train_tiny.py --temporal none              # the rolling ablation: roll (paper) | none | flatten
    python train_tiny.py --ablation                   # all three modes at the same budget, one table
    python train_tiny.py --data clips.csv --vocab vocab.txt --init all-in-one-base.ckpt
    torchrun --nproc_per_node=4 train_tiny.py ...     # the same loop on several GPUs (DDP)

The synthetic clips show one coloured shape that moves left, right, up or down, appears or disappears. Colour and
shape can be read from any single frame; the motion only from the order of the frames. The held-out set is new
renders (new positions, sizes, speeds, backgrounds and noise) from a seed never used in training.
"""

import argparse
import bisect
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from allinone import AllInOne, Config, contrastive_loss, cosine_similarity, mlm_loss, mlm_mask, vtm_batch, vtm_loss

# -----------------------------------------------------------------------------
# Options: every command-line flag comes from this dataclass


@dataclass
class Options:
    preset: str = field(default="nano", metadata={"help": "model size from allinone.PRESETS (ignored with --init)"})
    temporal: str = field(default="roll", metadata={"help": "temporal modelling: roll (paper) | none | flatten"})
    fold_div: int = field(default=8, metadata={"help": "rolling moves 1/fold_div of each frame's tokens each way"})
    steps: int = field(default=1800, metadata={"help": "train until this step (with --resume: continue to it)"})
    horizon: int = field(default=1800, metadata={"help": "steps the learning-rate decay and the mismatch curriculum "
                                                          "are laid out over, whatever --steps is"})
    batch: int = field(default=128, metadata={"help": "clips per step, over all processes"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps, then cosine decay to 10%% over --horizon"})
    clip_grad: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the model"})
    temperature: float = field(default=0.05, metadata={"help": "contrastive temperature (official: 0.05)"})
    vtm_clips: int = field(default=32, metadata={"help": "clips per step in the VTM pass (the contrastive passes take "
                                                          "the whole batch)"})
    mlm_clips: int = field(default=8, metadata={"help": "clips per step in the separate MLM pass (0: no MLM)"})
    curriculum: float = field(default=0.75, metadata={"help": "share of --horizon whose VTM mismatches mostly differ "
                                                              "only in the time words (synthetic data)"})
    temporal_negatives: float = field(default=0.8, metadata={"help": "share of VTM mismatches that differ only in the "
                                                                      "time words during the curriculum (after it: half)"})
    eval_every: int = field(default=600, metadata={"help": "evaluate on the held-out set every N steps and at the end"})
    eval_clips: int = field(default=512, metadata={"help": "held-out clips to evaluate on"})
    log_every: int = field(default=100, metadata={"help": "print a log line every N steps"})
    ckpt_every: int = field(default=600, metadata={"help": "write OUT/ckpt.pt every N steps (and at the end, on Ctrl-C)"})
    out: str = field(default="out/tiny", metadata={"help": "output folder: ckpt.pt, metrics.jsonl, samples.png"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/ckpt.pt"})
    init: str = field(default="", metadata={"help": "start from an official All-in-One checkpoint (needs --vocab)"})
    vocab: str = field(default="", metadata={"help": "a BERT vocab.txt (default: a word-level vocabulary of the data)"})
    seed: int = field(default=0, metadata={"help": "seed of data, initialisation and masking"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu) | cuda | mps | cpu"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step"})
    ablation: bool = field(default=False, metadata={"help": "train roll, none and flatten in turn and print a table"})
    samples: int = field(default=0, metadata={"help": "write OUT/samples.png with this many training clips and stop"})
    data: str = field(default="", metadata={"help": "train on your clips: a CSV or JSON-lines file of video, caption "
                                                     "and optional start, end (seconds)"})
    val_data: str = field(default="", metadata={"help": "held-out clips, same format (default: --val-share of --data)"})
    val_share: float = field(default=0.05, metadata={"help": "share of --data's videos held out when no --val-data"})
    video_root: str = field(default="", metadata={"help": "folder the video paths are relative to (default: the "
                                                           "data file's)"})
    workers: int = field(default=2, metadata={"help": "DataLoader processes decoding clips (0: in the main process)"})
    max_bad_share: float = field(default=0.1, metadata={"help": "stop when more than this share of clips fail to load"})


def parse_options(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Options):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"] + " (default: %(default)s)")
    opts = Options(**vars(p.parse_args(argv)))
    problems = [
        opts.temporal not in ("roll", "none", "flatten") and f"--temporal must be roll, none or flatten, not {opts.temporal!r}",
        opts.steps < 1 and "--steps must be at least 1",
        opts.horizon < 1 and "--horizon must be at least 1",
        opts.batch < 2 and "--batch must be at least 2 (VTM needs mismatched pairs)",
        not 2 <= opts.vtm_clips <= opts.batch and "--vtm-clips must be between 2 and --batch",
        not 0 <= opts.mlm_clips <= opts.batch and "--mlm-clips must be between 0 and --batch",
        not 0 <= opts.curriculum <= 1 and "--curriculum must be between 0 and 1",
        not 0 <= opts.temporal_negatives <= 1 and "--temporal-negatives must be between 0 and 1",
        opts.init and not opts.vocab and "--init needs --vocab: official checkpoints use BERT's vocabulary",
        opts.ablation and opts.resume and "--ablation starts three fresh runs; it cannot --resume",
        opts.data and not Path(opts.data).is_file() and f"--data {opts.data}: no such file",
        opts.val_data and not Path(opts.val_data).is_file() and f"--val-data {opts.val_data}: no such file",
        not 0 < opts.val_share < 1 and "--val-share must be between 0 and 1",
        opts.workers < 0 and "--workers must be 0 or more",
    ]
    for problem in problems:
        if problem:
            p.error(problem)
    return opts


# -----------------------------------------------------------------------------
# Synthetic clips: a caption grammar and a renderer

COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("square", "circle", "triangle")
MOTIONS = {  # caption words -> (dx, dy) per frame, or the frames the shape is visible in
    "moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
    "appears": "later", "disappears": "earlier",
}
TIME_SWAP = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
             "moves down": "moves up", "appears": "disappears", "disappears": "appears"}
CAPTIONS = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]  # the caption bank: every caption there is


def caption_text(i):
    colour, shape, motion = CAPTIONS[i]
    return f"a {colour} {shape} {motion}"


def time_swapped(i):
    colour, shape, motion = CAPTIONS[i]
    return CAPTIONS.index((colour, shape, TIME_SWAP[motion]))


def looks_variants(i):
    """Indices of the captions that differ from caption i only in the colour or only in the shape (3 + 2 of them)."""
    colour, shape, motion = CAPTIONS[i]
    return ([CAPTIONS.index((c, shape, motion)) for c in COLOURS if c != colour]
            + [CAPTIONS.index((colour, s, motion)) for s in SHAPES if s != shape])


def time_variants(i):
    """Indices of the captions that differ from caption i only in the time words: i first, its time-swap second."""
    colour, shape, _ = CAPTIONS[i]
    first = [i, time_swapped(i)]
    return first + [j for j in (CAPTIONS.index((colour, shape, m)) for m in MOTIONS) if j not in first]


def render(captions, frames, size, generator):
    """Clips for caption indices: (b, t, 3, size, size) in [-1, 1]."""
    b, g, s = len(captions), generator, size

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=g)

    colour, shape, motion = zip(*(CAPTIONS[i] for i in captions))
    step = torch.tensor([MOTIONS[m] if isinstance(MOTIONS[m], tuple) else (0, 0) for m in motion], dtype=torch.float)
    r = uniform(0.16, 0.20) * s  # half the shape's size
    speed = uniform(0.10, 0.16) * s  # pixels per frame
    travel = step * (speed * (frames - 1))[:, None]  # (b, 2)
    lo, hi = r[:, None] + (-travel).clamp(min=0), s - r[:, None] - travel.clamp(min=0)
    start = lo + (hi - lo) * torch.rand(b, 2, generator=g)  # the whole path stays inside the frame
    t = torch.arange(frames, dtype=torch.float)
    centre = start[:, None] + step[:, None] * speed[:, None, None] * t[None, :, None]  # (b, t, 2)
    cut = torch.randint(1, frames, (b, 1), generator=g)  # appears at / disappears from this frame
    visible = torch.stack([torch.ones(frames, dtype=torch.bool) if m.startswith("moves") else
                           (t >= cut[i]) if m == "appears" else (t < cut[i]) for i, m in enumerate(motion)])
    yx = torch.arange(s, dtype=torch.float) + 0.5
    dx = yx[None, None, None, :] - centre[..., 0, None, None]  # (b, t, 1, s)
    dy = yx[None, None, :, None] - centre[..., 1, None, None]  # (b, t, s, 1)
    rr = r[:, None, None, None]
    masks = {
        "square": (dx.abs() <= 0.85 * rr) & (dy.abs() <= 0.85 * rr),
        "circle": dx**2 + dy**2 <= rr**2,
        "triangle": (dy >= -rr) & (dy <= 0.8 * rr) & (dx.abs() <= 0.6 * (dy + rr)),
    }
    inside = torch.stack([masks[shape[i]][i] for i in range(b)]) & visible[:, :, None, None]  # (b, t, s, s)
    fg = torch.tensor([COLOURS[c] for c in colour]) + uniform(-0.08, 0.08, b, 3)
    bg = uniform(0.0, 0.45, b, 1) + uniform(-0.1, 0.1, b, 3)  # a dull background colour
    video = torch.where(inside[:, :, None], fg[:, None, :, None, None], bg[:, None, :, None, None])
    video = video + uniform(0.01, 0.06, b)[:, None, None, None, None] * torch.randn(video.shape, generator=g)
    return (video.clamp(0, 1) * 2 - 1).contiguous()


# -----------------------------------------------------------------------------
# Real clips: frames sampled as in the paper's code, decoded with PyAV by seeking to the keyframe before each


class ClipError(ValueError):
    """A clip that cannot be loaded; the message names the file and the reason."""


def segment_frames(n, num_frames, train=False, generator=None):
    """Split n frames into num_frames equal segments, segment k = floor(k n / T) .. floor((k+1) n / T) - 1, and take
    each one's middle frame (evaluation) or a random one (training). With n < T some segments are empty and take
    their first frame, so frames repeat in order."""
    picks = []
    for k in range(num_frames):
        lo = k * n // num_frames
        hi = max(lo, (k + 1) * n // num_frames - 1)
        picks.append(int(torch.randint(lo, hi + 1, (1,), generator=generator)) if train else (lo + hi) // 2)
    return picks


def frame_table(container, stream):
    """Presentation times of all frames and of the keyframes, from the packets alone (no decoding)."""
    pts, keys, packets = [], [], 0
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None:  # the demuxer's closing flush packet
            continue
        packets += 1
        if packet.pts is not None and not packet.is_discard:
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    if stream.frames and packets < stream.frames:  # a cut file whose index (at the front) promises more
        raise ClipError(f"truncated ({packets} of {stream.frames} frames)")
    return sorted(pts), sorted(keys) or sorted(pts)[:1]


def decode_at(container, stream, wanted, keys):
    """Frames shown at the sorted times `wanted`: seek to the keyframe before one, decode forward to it, and seek
    again only to jump over a keyframe. A demuxer that seeks by decode time (MPEG-TS) can land a keyframe late:
    then the keyframe before, then the start of the file."""
    found, frames, last = {}, None, None
    for p in wanted:
        i = max(bisect.bisect_right(keys, p) - 1, 0)
        if frames is None or last.pts < keys[i]:
            for key in keys[max(i - 1, 0): i + 1][::-1] + [-(2**40)]:
                container.seek(key, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                last = next(frames, None)
                if last is not None and last.pts <= p:
                    break
        while last is None or last.pts < p:
            last = next(frames, None)
            if last is None:
                raise ClipError(f"no frame decoded at pts {p}")
        found[p] = last
    return found


def to_rgb(frame, size, crop):
    """A decoded frame as uint8 (size, size, 3): shorter side resized to size (PyAV, in C), turned upright as its
    rotation metadata says, then cropped at relative offsets crop (0.5, 0.5 = the centre)."""
    quarter = round(frame.rotation / 90) % 4  # counter-clockwise quarter turns that make it upright
    w, h = (frame.height, frame.width) if quarter % 2 else (frame.width, frame.height)  # as shown
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    stored_w, stored_h = (h, w) if quarter % 2 else (w, h)
    img = np.rot90(frame.reformat(width=stored_w, height=stored_h, format="rgb24").to_ndarray(), quarter)
    y, x = int(crop[0] * (h - size + 1)), int(crop[1] * (w - size + 1))
    return img[y: y + size, x: x + size]


def load_clip(path, num_frames, size, train=False, start=None, end=None, generator=None):
    """num_frames frames of a video as float32 (num_frames, 3, size, size) in [-1, 1], picked among the frames whose
    time (seconds from the first frame) lies in [start, end). Training picks random frames of each segment and a
    random crop (from generator); evaluation the segment middles and the centre. Raises ClipError."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            if torch.utils.data.get_worker_info() is None:  # slice threads: no frame delay after each seek
                stream.codec_context.thread_type = "SLICE"
            else:  # one thread in each DataLoader worker, so that workers do not oversubscribe the CPU
                stream.codec_context.thread_count = 1
            pts, keys = frame_table(container, stream)
            first = pts[0] if pts else 0
            lo = first + (start or 0) / stream.time_base
            hi = math.inf if end is None else first + end / stream.time_base
            pts = [p for p in pts if lo <= p < hi]
            if not pts:
                raise ClipError("no video frames" + ("" if start is None and end is None else f" in [{start}, {end}) s"))
            wanted = [pts[i] for i in segment_frames(len(pts), num_frames, train, generator)]
            crop = torch.rand(2, generator=generator).tolist() if train else (0.5, 0.5)
            frames = decode_at(container, stream, sorted(set(wanted)), keys)
            clip = np.stack([to_rgb(frames[p], size, crop) for p in wanted])
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise ClipError(f"cannot load {path}: {e}") from e
    return torch.from_numpy(clip).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)


def read_rows(path, video_root=""):
    """A CSV (with a header) or JSON-lines file of video, caption and optional start, end (seconds). Video paths are
    relative to video_root, else to the file's folder. A bad row is an error that names its line."""
    path = Path(path)
    root = Path(video_root) if video_root else path.parent
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix in (".jsonl", ".json"):
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
            rows = []
            for n, line in lines:
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
        else:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
    out = []
    for n, row in rows:
        where = f"{path} line {n}"
        if not isinstance(row, dict) or not str(row.get("video") or "").strip():
            raise ValueError(f"{where}: no 'video'")
        caption = str(row.get("caption") or "").strip()
        if not caption:
            raise ValueError(f"{where}: empty caption")
        try:
            start, end = (None if row.get(k) in (None, "") else float(row[k]) for k in ("start", "end"))
        except ValueError:
            raise ValueError(f"{where}: start and end must be seconds, got {row.get('start')!r}, {row.get('end')!r}") from None
        if start is not None and end is not None and not start < end:
            raise ValueError(f"{where}: start {start} is not before end {end}")
        out.append(dict(video=str(root / str(row["video"]).strip()), caption=caption, start=start, end=end))
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


class ClipDataset(torch.utils.data.Dataset):
    """Item (index, seed): that row's clip, or, when its file cannot be loaded, the next row's; the failures ride
    along to the main process, which reports and counts them. Training items are random (frames, crop) by seed."""

    def __init__(self, rows, frames, size, train):
        self.rows, self.frames, self.size, self.train = rows, frames, size, train

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        index, seed = item
        failures = []
        for i in range(index, index + 20):
            row = self.rows[i % len(self.rows)]
            try:
                clip = load_clip(row["video"], self.frames, self.size, self.train, row["start"], row["end"],
                                 torch.Generator().manual_seed(seed))
                return clip, row["caption"], failures
            except ClipError as e:
                failures.append((row["video"], str(e)))
        raise RuntimeError("20 rows in a row failed to load:\n" + "\n".join(msg for _, msg in failures))


def collate(items):
    clips, captions, failures = zip(*items)
    return torch.stack(clips), list(captions), [f for fs in failures for f in fs]


class StepBatches:
    """Index lists for steps start..steps-1: epochs of seeded permutations, each step's global batch split among
    the processes (a distributed sampler); the same in every run, so --resume continues the same order."""

    def __init__(self, n, batch, seed, rank, world, start, steps):
        self.n, self.batch, self.seed, self.rank, self.world, self.start, self.steps = n, batch, seed, rank, world, start, steps
        self.epoch, self.order = None, None

    def __len__(self):
        return self.steps - self.start

    def position(self, p):  # the p-th sample of the whole run
        epoch, i = divmod(p, self.n)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self.order[i]), self.seed * 1_000_003 + p

    def __iter__(self):
        per = self.batch // self.world
        for step in range(self.start, self.steps):
            first = step * self.batch + self.rank * per
            yield [self.position(p) for p in range(first, first + per)]


# -----------------------------------------------------------------------------
# Tokenizer: a word-level one for the synthetic grammar, or BERT's WordPiece from a vocab.txt

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(vocab_file, captions):
    """BERT's WordPiece from a vocab.txt, or else a word-level vocabulary of the captions, with BERT's special tokens."""
    if vocab_file:
        vocab = {w: i for i, w in enumerate(Path(vocab_file).read_text(encoding="utf-8").splitlines())}
        missing = [s for s in SPECIALS if s not in vocab]
        if missing:
            raise ValueError(f"{vocab_file} lacks the special tokens {missing}: is it a BERT vocab.txt?")
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    else:
        normalizer, split = normalizers.Lowercase(), pre_tokenizers.Whitespace()
        words = {w for c in captions for w, _ in split.pre_tokenize_str(normalizer.normalize_str(c))}
        vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, split
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(s, vocab[s]) for s in ("[CLS]", "[SEP]")])
    return tok


class Text:
    """Tokenizes captions to (ids, mask) of the batch's longest caption, at most max_len tokens."""

    def __init__(self, tokenizer, max_len):
        self.tok, self.max_len = tokenizer, max_len
        self.tok.enable_truncation(max_len)
        self.tok.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        self.mask_id = tokenizer.token_to_id("[MASK]")
        self.special_ids = tuple(tokenizer.token_to_id(s) for s in ("[PAD]", "[CLS]", "[SEP]"))

    def __call__(self, captions, device="cpu"):
        enc = self.tok.encode_batch(list(captions))
        ids = torch.tensor([e.ids for e in enc], device=device)
        return ids, torch.tensor([e.attention_mask for e in enc], device=device)


# -----------------------------------------------------------------------------
# One training step's losses, as one module so that DistributedDataParallel sees a single forward call


def gather(x):
    """All processes' rows, with gradients flowing back to each process's own (identity without torchrun)."""
    return torch.cat(torch.distributed.nn.functional.all_gather(x)) if dist.is_initialized() else x


class Objective(nn.Module):
    def __init__(self, model, temperature):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, batch):
        m, out = self.model, {}
        # VTM: a joint pass over matched and mismatched pairs, with the VTM head on the pooled text [CLS]
        k = len(batch["vtm_ids"])  # the first k clips
        logits = m.vtm_head(m(batch["video"][:k], batch["vtm_ids"], batch["vtm_mask"]).pooled)
        out["vtm"] = vtm_loss(logits, batch["vtm_labels"])
        out["vtm_acc"] = (logits.argmax(-1) == batch["vtm_labels"]).float().mean().detach()
        # MLM: a separate joint pass with masked captions, as in the official code (masking only in matched VTM
        # pairs would leak the label: "has a [MASK]" would mean "matches")
        if "mlm_ids" in batch:
            k = len(batch["mlm_ids"])
            out["mlm"] = mlm_loss(m.mlm_head(m(batch["video"][:k], batch["mlm_ids"], batch["mlm_mask"]).text),
                                  batch["mlm_labels"])
        # Contrastive (unimodal passes): the video alone against the texts alone
        video = m.video_proj(m.encode_video(batch["video"]).video[:, 0])  # (b, contrastive_dim)
        text = m.text_proj(m.encode_text(batch["text_ids"], batch["text_mask"]).text[:, 0])
        if "bank_targets" in batch:  # text holds every caption there is: each clip must pick its own among all
            out["bank"] = F.cross_entropy(cosine_similarity(video, text) / self.temperature, batch["bank_targets"])
            text = text[batch["bank_targets"]]
        out["itc"] = contrastive_loss(gather(text), gather(video), self.temperature)
        out["loss"] = sum(value for name, value in out.items() if not name.endswith("_acc"))
        return out


# -----------------------------------------------------------------------------
# Data sources: each yields training batches (as dicts of tensors) and a held-out set


def step_generator(seed, step, rank):
    return torch.Generator().manual_seed(hash((seed, step, rank)) % 2**62)


def add_mlm(batch, ids, mask, text, vocab_size, g):
    """The MLM pass's inputs: the first clips' own captions, BERT-masked."""
    if len(ids):
        masked, labels = mlm_mask(ids.cpu(), mask.cpu(), vocab_size, mask_id=text.mask_id, special_ids=text.special_ids,
                                  generator=g)
        batch.update(mlm_ids=masked.to(ids.device), mlm_mask=mask, mlm_labels=labels.to(ids.device))
    return batch


class Synthetic:
    """Synthetic clips rendered on the fly: batch k of process r is the same in every run."""

    def __init__(self, cfg, text, opts, device, rank=0, world=1):
        self.cfg, self.text, self.opts, self.device, self.rank, self.world = cfg, text, opts, device, rank, world
        self.bank_ids, self.bank_mask = text([caption_text(i) for i in range(len(CAPTIONS))], device)
        self.time_variants = torch.tensor([time_variants(i) for i in range(len(CAPTIONS))])  # (72, 6)
        self.looks_variants = torch.tensor([looks_variants(i) for i in range(len(CAPTIONS))])  # (72, 5)
        self.skipped = None

    def batch(self, step):
        o, g = self.opts, step_generator(self.opts.seed, step, self.rank)
        b = o.batch // self.world
        captions = torch.randint(len(CAPTIONS), (b,), generator=g)
        video = render(captions.tolist(), self.cfg.frames, self.cfg.image_size, g).to(self.device)
        # VTM pairs: half keep their caption; a mismatched one gets, during the curriculum, mostly a caption that
        # differs only in the time words (only the order of the frames tells them apart); otherwise, as often, one
        # that differs only in the colour or only in the shape, or any other caption
        k, own = o.vtm_clips // self.world, captions[: o.vtm_clips // self.world]  # the VTM pass takes the first k clips
        labels = (torch.randperm(k, generator=g) < k // 2).long()  # 1: matched
        share = o.temporal_negatives * (1 if step < o.curriculum * o.horizon else 0.5)
        pick = torch.randint(1, 6, (k,), generator=g)  # one of the 5 other time variants
        time_wrong = self.time_variants[own, pick]
        pick = torch.randint(0, 5, (k,), generator=g)  # one of the 5 looks variants
        looks_wrong = self.looks_variants[own, pick]
        other = (own + torch.randint(1, len(CAPTIONS), (k,), generator=g)) % len(CAPTIONS)
        other = torch.where(torch.rand(k, generator=g) < 0.5, looks_wrong, other)
        vtm = torch.where(labels.bool(), own, torch.where(torch.rand(k, generator=g) < share, time_wrong, other))
        captions, vtm = captions.to(self.device), vtm.to(self.device)
        # contrastive: the text side is the whole caption bank; each clip's target is its caption
        batch = dict(video=video, vtm_ids=self.bank_ids[vtm], vtm_mask=self.bank_mask[vtm], vtm_labels=labels.to(self.device),
                     text_ids=self.bank_ids, text_mask=self.bank_mask, bank_targets=captions)
        k = o.mlm_clips // self.world
        return add_mlm(batch, self.bank_ids[captions[:k]], self.bank_mask[captions[:k]], self.text, self.cfg.vocab_size, g)

    def batches(self, start):
        for step in range(start, self.opts.steps):
            yield self.batch(step)

    def held_out(self):
        g = torch.Generator().manual_seed(10_000_019 + self.opts.seed)  # a seed no training batch uses
        captions = torch.randint(len(CAPTIONS), (self.opts.eval_clips,), generator=g)
        options = self.time_variants[captions]  # (n, 6)
        return dict(video=render(captions.tolist(), self.cfg.frames, self.cfg.image_size, g),
                    ids=self.bank_ids[captions].cpu(), mask=self.bank_mask[captions].cpu(), label=captions,
                    options_ids=self.bank_ids[options].cpu(), options_mask=self.bank_mask[options].cpu())

    def samples(self, k):
        g = torch.Generator().manual_seed(self.opts.seed)
        captions = torch.randint(len(CAPTIONS), (k,), generator=g)
        return render(captions.tolist(), self.cfg.frames, self.cfg.image_size, g), [caption_text(int(c)) for c in captions]


class Skipped:
    """Clips that failed to load: each file reported once, every skipped sample counted; too many stop the run."""

    def __init__(self, max_share, loud):
        self.max_share, self.loud, self.files, self.count, self.total = max_share, loud, {}, 0, 0

    def add(self, failures, loaded):
        for path, message in failures:
            if path not in self.files and self.loud:
                print(f"warning: skipped {message}", flush=True)
            self.files.setdefault(path, message)
        self.count += len(failures)
        self.total += len(failures) + loaded
        if self.total >= 20 and self.count > self.max_share * self.total:
            examples = "\n  ".join(list(self.files.values())[:5])
            raise RuntimeError(f"{self.count} of {self.total} clips failed to load, more than --max-bad-share "
                               f"{self.max_share}; for example:\n  {examples}")


class Clips:
    """Your clips (--data): decoded with PyAV in DataLoader workers; a file that fails is skipped and counted."""

    def __init__(self, rows, cfg, text, opts, device, rank=0, world=1):  # rows: read_rows(opts.data)
        self.cfg, self.text, self.opts, self.device, self.rank, self.world = cfg, text, opts, device, rank, world
        if opts.val_data:
            val = read_rows(opts.val_data, opts.video_root)
        else:  # hold out whole videos, so that no video is in both
            videos = sorted({r["video"] for r in rows})
            random.Random(opts.seed).shuffle(videos)
            held = set(videos[: max(1, round(opts.val_share * len(videos)))]) if len(videos) > 1 else set()
            rows, val = [r for r in rows if r["video"] not in held], [r for r in rows if r["video"] in held]
        if not rows or not val:
            raise ValueError(f"{opts.data}: need clips both to train on and to hold out (got {len(rows)} and {len(val)})")
        self.rows, self.val = rows, val[: opts.eval_clips]
        self.truncated = sum(bool(e.overflowing) for e in text.tok.encode_batch([r["caption"] for r in rows]))
        self.skipped = Skipped(opts.max_bad_share, loud=rank == 0)
        if rank == 0:
            print(f"{opts.data}: {len(rows)} training and {len(val)} held-out rows ({len(self.val)} evaluated); "
                  f"{self.truncated} captions longer than {cfg.max_text_len} tokens are truncated")

    def loader(self, rows, train, sampler):
        return torch.utils.data.DataLoader(
            ClipDataset(rows, self.cfg.frames, self.cfg.image_size, train), batch_sampler=sampler, collate_fn=collate,
            num_workers=self.opts.workers, pin_memory=self.device.type == "cuda")

    def batches(self, start):
        o = self.opts
        sampler = StepBatches(len(self.rows), o.batch, o.seed, self.rank, self.world, start, o.steps)
        for step, (video, captions, failures) in enumerate(self.loader(self.rows, True, sampler), start):
            self.skipped.add(failures, len(video))
            g = step_generator(o.seed, step, self.rank)
            ids, mask = self.text(captions, self.device)
            other, labels = vtm_batch(torch.arange(o.vtm_clips // self.world), generator=g)  # half: another's caption
            batch = dict(video=video.to(self.device, non_blocking=True), vtm_ids=ids[other.to(self.device)],
                         vtm_mask=mask[other.to(self.device)], vtm_labels=labels.to(self.device), text_ids=ids, text_mask=mask)
            k = o.mlm_clips // self.world
            yield add_mlm(batch, ids[:k], mask[:k], self.text, self.cfg.vocab_size, g)

    def held_out(self):
        sampler = [[(i, 0)] for i in range(len(self.val))]
        video, captions = [], []
        for v, c, failures in self.loader(self.val, False, sampler):
            if not failures:  # a failed row is replaced by the next one: keep the held-out set free of repeats
                video.append(v)
                captions += c
            self.skipped.add(failures, len(v))
        names = {c: i for i, c in enumerate(sorted(set(captions)))}
        ids, mask = self.text(captions)
        return dict(video=torch.cat(video), ids=ids, mask=mask, label=torch.tensor([names[c] for c in captions]))

    def samples(self, k):
        video, captions, _ = collate([ClipDataset(self.rows, self.cfg.frames, self.cfg.image_size, False)[(i, 0)]
                                      for i in range(min(k, len(self.rows)))])
        return video, captions


# -----------------------------------------------------------------------------
# Evaluation on the held-out set


def recall_at_k(sim, query_labels, item_labels, k):
    """Share of queries (rows of sim) whose k most similar items include one with the query's label."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # (q, k)
    return (item_labels[top] == query_labels[:, None]).any(1).float().mean().item()


def multiple_choice_acc(scores, answer):
    """Share of rows whose highest score is at the answer's column."""
    return (scores.argmax(1) == answer).float().mean().item()


@torch.no_grad()
def evaluate(model, held, text, autocast, chunk=256):
    """Held-out metrics (README: "What the metrics mean"). Retrieval is dual-stream: the contrastive features of the
    text-only and video-only passes, over the whole held-out set; a hit is a clip whose caption equals the query's,
    every word included (so, for synthetic clips, the time word too)."""
    model.eval()
    dev = next(model.parameters()).device
    video, ids, mask, label = held["video"], held["ids"], held["mask"], held["label"]
    n = len(label)

    def chunked(fn, *tensors):
        out = []
        for s in range(0, n, chunk):
            with autocast:
                out.append(fn(*(x[s: s + chunk].to(dev) for x in tensors)))
        return torch.cat(out)

    def vtm_logits(ids, mask):  # clip i with caption ids[i]
        return chunked(lambda v, i, m: model.vtm_head(model(v, i, m).pooled).float(), video, ids, mask)

    # VTM: every clip with its own caption, and with a different caption of another held-out clip
    g = torch.Generator().manual_seed(1)
    other = (torch.arange(n) + torch.randint(1, n, (n,), generator=g)) % n
    for _ in range(20):  # until each other caption differs (a few tries settle it)
        same = label[other] == label
        other[same] = (other[same] + torch.randint(1, n, (int(same.sum()),), generator=g)) % n
    matched = vtm_logits(ids, mask).argmax(-1) == 1
    metrics = dict(vtm_acc=(matched.float().mean() + (vtm_logits(ids[other], mask[other]).argmax(-1) == 0).float().mean()).item() / 2)
    if "options_ids" in held:  # synthetic: each caption's time variants, own first, time-swapped second
        options = torch.stack([vtm_logits(held["options_ids"][:, j], held["options_mask"][:, j])
                               for j in range(held["options_ids"].shape[1])], 1)  # (n, 6, 2)
        metrics["vtm_acc_temporal"] = (matched.float().mean() + (options[:, 1].argmax(-1) == 0).float().mean()).item() / 2
        metrics["mc_acc"] = multiple_choice_acc(options[..., 1] - options[..., 0], torch.zeros(n, dtype=torch.long, device=dev))
    # MLM: BERT masking of the held-out captions (a fixed seed), accuracy at the masked positions
    masked, labels = mlm_mask(ids, mask, model.cfg.vocab_size, mask_id=text.mask_id, special_ids=text.special_ids,
                              generator=torch.Generator().manual_seed(2))
    pred = chunked(lambda v, i, m: model.mlm_head(model(v, i, m).text).argmax(-1), video, masked, mask).cpu()
    metrics["mlm_acc"] = (pred == labels)[labels != -100].float().mean().item()
    # retrieval
    t = chunked(lambda i, m: model.text_proj(model.encode_text(i, m).text[:, 0]).float(), ids, mask)
    v = chunked(lambda v: model.video_proj(model.encode_video(v).video[:, 0]).float(), video)
    sim = cosine_similarity(t, v)  # (n captions, n clips)
    label = label.to(dev)
    metrics.update(t2v_r1=recall_at_k(sim, label, label, 1), t2v_r5=recall_at_k(sim, label, label, 5),
                   v2t_r1=recall_at_k(sim.T, label, label, 1))
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# Checkpoints that lose nothing


def save_atomic(obj, path):
    """Write to a temporary file beside path, then rename: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Setup


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dist.is_initialized() and name == "cuda":
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def mixed_precision(device):
    """bf16 autocast where the device has it, fp16 with a loss scaler otherwise, full precision on the CPU."""
    if device.type == "cpu":
        return torch.autocast("cpu", enabled=False), None
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    return torch.autocast(device.type, dtype=dtype), None if bf16 else torch.amp.GradScaler(device.type)


def lr_at(step, o):
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    progress = min(1.0, (step - o.warmup) / max(1, o.horizon - o.warmup))
    return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def flop_counter():
    """torch's FLOP counter, taught the CPU attention kernels it does not count by itself (torch 2.13)."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v),
    })


def write_samples(path, video, captions):
    """A PNG strip, one clip per row, frames left to right, written with PyAV."""
    video = F.pad(video, (0, 1), value=1.0)  # a white line after each frame
    img = ((rearrange(video, "k t c h w -> (k h) (t w) c") + 1) * 127.5).clamp(0, 255).byte()
    img = img.repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()  # 4x larger, so the pixels show
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = img.shape[1], img.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    Path(path).with_suffix(".txt").write_text("\n".join(captions) + "\n")


# -----------------------------------------------------------------------------
# Training


def train(opts):
    distributed = "RANK" in os.environ  # started by torchrun
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and opts.device in ("auto", "cuda") else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    main = rank == 0
    if opts.batch % world or opts.vtm_clips % world or opts.mlm_clips % world:
        raise ValueError(f"--batch, --vtm-clips and --mlm-clips must divide among the {world} processes")
    device = pick_device(opts.device)
    autocast, scaler = mixed_precision(device)
    out_dir, ckpt = Path(opts.out), None
    ckpt_path = out_dir / "ckpt.pt"
    torch.manual_seed(opts.seed)

    # model and tokenizer: from the checkpoint to resume, from an official checkpoint, or new
    rows = read_rows(opts.data, opts.video_root) if opts.data else None
    if opts.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        tokenizer, cfg = Tokenizer.from_str(ckpt["tokenizer"]), Config(**ckpt["config"])
    else:
        captions = [r["caption"] for r in rows] if rows else [caption_text(i) for i in range(len(CAPTIONS))]
        tokenizer = make_tokenizer(opts.vocab, captions)
        cfg = Config.preset(opts.preset, vocab_size=tokenizer.get_vocab_size())
    # video_only_temporal: the video-only pass models time too, so the contrastive losses can learn it (README)
    cfg = dataclasses.replace(cfg, temporal=opts.temporal, fold_div=opts.fold_div, video_only_temporal=True,
                              dropout=opts.dropout)
    if opts.init and not opts.resume:
        model = AllInOne.from_official(opts.init, temporal=opts.temporal, fold_div=opts.fold_div, video_only_temporal=True,
                                       dropout=opts.dropout)
        cfg = model.cfg
        if cfg.vocab_size != tokenizer.get_vocab_size():
            raise ValueError(f"{opts.init} has a {cfg.vocab_size}-word vocabulary, {opts.vocab} {tokenizer.get_vocab_size()}")
    else:
        model = AllInOne(cfg)
    text = Text(tokenizer, cfg.max_text_len)
    data = Clips(rows, cfg, text, opts, device, rank, world) if rows else Synthetic(cfg, text, opts, device, rank, world)
    if opts.samples:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_samples(out_dir / "samples.png", *data.samples(opts.samples))
        print(f"wrote {out_dir / 'samples.png'} and {out_dir / 'samples.txt'}")
        return None

    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=opts.lr, betas=(0.9, 0.98), fused=device.type in ("cuda", "cpu"))
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"])
    objective = Objective(model, opts.temperature)
    if distributed:
        objective = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=opts.mlm_clips == 0)
    step_fn = torch.compile(objective) if opts.compile else objective
    held = data.held_out() if main else None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"All-in-One, temporal {opts.temporal}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{cfg.frames} frames of {cfg.image_size} px; {device}, {world} process(es), batch {opts.batch}"
              + (f"; resumed from {ckpt_path} at step {step}" if ckpt else ""))

    def checkpoint():
        if main:
            save_atomic(dict(model=model.state_dict(), config=dataclasses.asdict(cfg), options=dataclasses.asdict(opts),
                             tokenizer=tokenizer.to_str(), optimizer=opt.state_dict(), step=step, rng=rng_state()),
                        ckpt_path)

    start, t0, last, flops, counter = step, time.time(), None, None, flop_counter()
    totals, logged = {}, 0
    try:
        for batch in data.batches(step):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, opts)
            with counter if flops is None else contextlib.nullcontext():  # FLOPs of the first step, eager
                with autocast:
                    out = (objective if flops is None else step_fn)(batch)
                (scaler.scale(out["loss"]) if scaler else out["loss"]).backward()
            if flops is None:
                flops = counter.get_total_flops() / len(batch["video"])
            if scaler:
                scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), opts.clip_grad)
            scaler.step(opt) if scaler else opt.step()
            if scaler:
                scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            logged += 1
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.item()
            if main and (step % opts.log_every == 0 or step == opts.steps):
                rate = (step - start) * opts.batch / (time.time() - t0)
                mean = {k: v / logged for k, v in totals.items()}
                parts = " ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "loss")
                bad = f" | skipped {data.skipped.count} clips" if data.skipped else ""
                print(f"step {step:5d}/{opts.steps} | loss {mean['loss']:.3f} ({parts}) | lr {lr_at(step - 1, opts):.1e} "
                      f"| {rate:.0f} clips/s | ETA {(opts.steps - step) * opts.batch / rate / 60:.1f} min{bad}", flush=True)
                totals, logged = {}, 0
            if main and (step % opts.eval_every == 0 or step == opts.steps):
                wall = time.time() - t0
                last = dict(step=step, **evaluate(model, held, text, autocast), clips_per_s=(step - start) * opts.batch / wall,
                            wall_s=wall, flops_per_clip=flops, temporal=opts.temporal)
                if data.skipped:
                    last.update(skipped_clips=data.skipped.count, truncated_captions=data.truncated)
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
                print("eval " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()),
                      flush=True)
            if step % opts.ckpt_every == 0 or step == opts.steps:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        if main:
            print(f"\ninterrupted at step {step}: saved {ckpt_path}; --resume continues")
        raise SystemExit(130)
    if main:
        print(f"done: {step - start} steps in {(time.time() - t0) / 60:.1f} min; {ckpt_path}")
    return last


def ablation(opts):
    rows = []
    for mode in ("roll", "none", "flatten"):
        print(f"\n=== --temporal {mode} ===")
        rows.append(train(dataclasses.replace(opts, temporal=mode, out=str(Path(opts.out) / mode))))
    keys = ["vtm_acc", "vtm_acc_temporal", "mc_acc", "mlm_acc", "t2v_r1", "t2v_r5", "v2t_r1", "clips_per_s",
            "flops_per_clip", "wall_s"]
    print(f"\n{'temporal':10}" + "".join(f"{k:>17}" for k in keys))
    for r in rows:
        print(f"{r['temporal']:10}" + "".join(f"{r[k] / 1e6:>13.1f} MFL" if k == "flops_per_clip" else f"{r[k]:17.3f}"
                                              for k in keys))
    return rows


if __name__ == "__main__":
    options = parse_options()
    warnings.filterwarnings("once")
    ablation(options) if options.ablation else train(options)
    if dist.is_initialized():
        dist.destroy_process_group()
