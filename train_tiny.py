"""
Train All-in-One (allinone.py) in minutes on synthetic clips, evaluate it as papers report, fine-tune it.

    python train_tiny.py                              # pre-train on synthetic clips (README: how long, what it prints)
    python train_tiny.py --temporal none              # the rolling ablation: roll (paper) | none | flatten
    python train_tiny.py --ablation                   # all three modes at the same budget, one table
    python train_tiny.py --task qa --init out/tiny/ckpt.pt --out out/qa    # fine-tune: open-ended QA (or --task mc)
    python train_tiny.py --eval-only --resume         # evaluate out/tiny/ckpt.pt again
    torchrun --nproc_per_node=4 train_tiny.py ...     # the same loop on several GPUs (DDP)

Your own videos: examples/train_videos.py, which hands its clips to the same loop.
Read top to bottom: options, the synthetic world, tokens, the objectives, the synthetic data, the training loop
(train), evaluation, and main. Below the banner (=====) is what the run calls by name: option checks, start points,
the run folder, devices, DDP.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from allinone import (
    HEADS, PRESETS, AllInOne, Config, contrastive_loss, cosine_similarity, first_hit_ranks, load_checkpoint, mlm_loss,
    mlm_mask, recall_metrics, strictly_best, vtm_loss,
)

# -----------------------------------------------------------------------------
# Options: every command-line flag is a field here (parse_options, below the banner, checks them)

TASKS = ("pretrain", "mc", "qa")
TASK_DEFAULTS = {  # options whose default depends on --task: pre-training from scratch, or fine-tuning a start point
    "pretrain": dict(steps=1200, horizon=1500, batch=128, lr=2e-3, warmup=100, eval_every=600, ckpt_every=600,
                     curve_every=100),
    # fine-tuning: short runs whose full evaluations (every 100 or 300 steps) are their curve
    "mc": dict(steps=300, horizon=300, batch=32, lr=5e-4, warmup=30, eval_every=100, ckpt_every=100, curve_every=0),
    "qa": dict(steps=900, horizon=900, batch=32, lr=5e-4, warmup=30, eval_every=300, ckpt_every=300, curve_every=0),
}


def option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Options:
    # what to train
    task: str = option("pretrain", "pretrain (VTM, MLM, contrastive) | mc (multiple choice) | qa (open-ended QA)")
    preset: str = option("nano", "model size from allinone.PRESETS (ignored with --init)")
    frames: int = option(0, "frames per clip (0: the preset's, or the --init checkpoint's)")
    image_size: int = option(0, "frame size in pixels, runs from scratch (0: the preset's)")
    temporal: str = option("", "roll (the paper) | none | flatten (default: the --init checkpoint's, else roll)")
    fold_div: int = option(0, "rolling moves 1/fold_div of each frame's tokens each way (0: --init's, else 8)")
    dropout: float = option(0.0, "dropout in the model")
    init: str = option("", "start from a checkpoint: an official one (needs --vocab) or a train_tiny.py ckpt.pt")
    attention_heads: int = option(0, "attention heads of an --init state dict whose width is not an official size")
    vocab: str = option("", "a BERT vocab.txt (default: a word-level vocabulary of the data)")
    preprocess: str = option("auto", "frames as: ours | official (auto: official for official checkpoints)")
    # how long and how fast
    steps: int = option(None, "train until this step (with --resume: continue to it)")
    horizon: int = option(None, "steps the learning-rate decay and the mismatch curriculum are laid out over")
    batch: int = option(None, "clips per step, over all processes")
    lr: float = option(None, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay (not of biases and LayerNorms, as the official code)")
    warmup: int = option(None, "linear warm-up steps, then cosine decay to 10%% over --horizon")
    clip_grad: float = option(1.0, "gradient-norm clipping")
    temperature: float = option(0.02, "contrastive temperature (official: 0.05, examples/train_videos.py's default)")
    vtm_clips: int = option(32, "clips per step in the VTM pass (the contrastive passes take the whole batch)")
    mlm_clips: int = option(8, "clips per step in the separate MLM pass (0: no MLM)")
    curriculum: float = option(0.6, "share of --horizon whose VTM mismatches mostly differ only in the time words")
    temporal_negatives: float = option(0.8, "share of VTM mismatches differing only in time words (half after "
                                            "--curriculum)")
    seed: int = option(0, "seed of data, initialisation and masking")
    # evaluation and output
    eval_every: int = option(None, "evaluate on the held-out set every N steps and at the end")
    eval_clips: int = option(512, "held-out clips to evaluate on")
    curve_every: int = option(None, "every N steps, a cheap evaluation on the first --curve-clips held-out clips: a "
                                    "'curve' row in metrics.jsonl, for examples/plot_curves.py (0: none)")
    curve_clips: int = option(64, "held-out clips of the --curve-every evaluations")
    order_test: bool = option(False, "also evaluate with each clip's frames reversed and shuffled (*_reversed, ...)")
    log_every: int = option(100, "print a log line every N steps")
    ckpt_every: int = option(None, "write OUT/ckpt.pt every N steps (and before each evaluation, at the end, Ctrl-C)")
    out: str = option("out/tiny", "run folder: ckpt.pt, metrics.jsonl; one run per folder")
    resume: bool = option(False, "continue the run in --out (its options come from its checkpoint)")
    restart: bool = option(False, "start over in an --out that holds a run: its files move to OUT/previous-<time>/")
    eval_only: bool = option(False, "evaluate the --resume or --init model, print a table, append to metrics.jsonl")
    ablation: bool = option(False, "train roll, none and flatten in turn and print a table")
    # the machine
    device: str = option("auto", "auto (cuda, then mps, then cpu) | cuda | mps | cpu")
    precision: str = option("auto", "auto (a GPU: bf16, or fp16 where it has none; the CPU: fp32) | fp32 | bf16 | fp16")
    accum: int = option(1, "gradient accumulation: each step's batch in N micro-batches, for less memory")
    checkpointing: bool = option(False, "activation checkpointing of the blocks: less memory, more time")
    compile: bool = option(False, "torch.compile the training step")

    def checks(self, need):  # the option checks of a subclass (examples/train_videos.py's): need(ok, message)
        pass

    # what --resume may change (nothing that changes the run's result), and also what --eval-only may
    may_change_on_resume = {"steps", "log_every", "eval_every", "ckpt_every", "curve_every", "curve_clips", "device",
                            "compile", "checkpointing", "order_test", "out", "resume", "eval_only"}
    may_change_to_evaluate = {"eval_clips"}


# -----------------------------------------------------------------------------
# The synthetic world: a caption grammar, questions about it, and a renderer

COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (0.95, 0.85, 0.1)}
SHAPES = {  # shape -> which pixels it covers, from their offsets (dx, dy) to its centre and its half-size r
    "square": lambda dx, dy, r: (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r),
    "circle": lambda dx, dy, r: dx**2 + dy**2 <= r**2,
    "triangle": lambda dx, dy, r: (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= 0.6 * (dy + r)),
}
MOTIONS = {  # caption words -> (dx, dy) per frame, or the frames the shape is visible in
    "moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1),
    "appears": "later", "disappears": "earlier",
}
TIME_SWAP = {"moves left": "moves right", "moves right": "moves left", "moves up": "moves down",
             "moves down": "moves up", "appears": "disappears", "disappears": "appears"}
CAPTIONS = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]  # the caption bank: every caption there is
QUESTIONS = {"colour": "what colour is the shape?", "shape": "what shape is it?", "motion": "what does the shape do?"}
ANSWERS = [*COLOURS, *SHAPES, *MOTIONS]  # the synthetic QA task's answer vocabulary


def caption_text(i):
    colour, shape, motion = CAPTIONS[i]
    return f"a {colour} {shape} {motion}"


def answer_to(i, kind):  # the answer to QUESTIONS[kind] about a clip of caption i
    colour, shape, motion = CAPTIONS[i]
    return {"colour": colour, "shape": shape, "motion": motion}[kind]


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
    """Clips for caption indices: (b, t, 3, size, size) in [0, 1], made on the generator's device."""
    b, g, s, dev = len(captions), generator, size, generator.device

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=g, device=dev)

    colours, shapes, motions = zip(*(CAPTIONS[i] for i in captions))
    kinds = ["moves", "appears", "disappears"]
    table = to_device(torch.tensor([[*(MOTIONS[m] if m.startswith("moves") else (0, 0)), kinds.index(m.split()[0]),
                                     *COLOURS[c]] for c, m in zip(colours, motions)]), dev)  # (b, 6), one copy
    step, kind, colour = table[:, :2], table[:, 2, None], table[:, 3:]
    r = uniform(0.16, 0.20) * s  # half the shape's size
    speed = uniform(0.10, 0.16) * s  # pixels per frame
    travel = step * (speed * (frames - 1))[:, None]  # (b, 2)
    lo, hi = r[:, None] + (-travel).clamp(min=0), s - r[:, None] - travel.clamp(min=0)
    start = lo + (hi - lo) * torch.rand(b, 2, generator=g, device=dev)  # the whole path stays inside the frame
    t = torch.arange(frames, dtype=torch.float, device=dev)
    centre = start[:, None] + step[:, None] * speed[:, None, None] * t[None, :, None]  # (b, t, 2)
    cut = torch.randint(1, frames, (b, 1), generator=g, device=dev)  # appears at / disappears from this frame
    visible = torch.where(kind == 1, t >= cut, torch.where(kind == 2, t < cut, True))  # (b, t)
    yx = torch.arange(s, dtype=torch.float, device=dev) + 0.5
    dx = yx[None, None, None, :] - centre[..., 0, None, None]  # (b, t, 1, s)
    dy = yx[None, None, :, None] - centre[..., 1, None, None]  # (b, t, s, 1)
    inside = torch.zeros(b, frames, s, s, dtype=torch.bool, device=dev)
    for name, covers in SHAPES.items():
        i = to_device(torch.tensor([k for k in range(b) if shapes[k] == name], dtype=torch.long), dev)  # its clips
        inside[i] = covers(dx[i], dy[i], r[i, None, None, None])
    inside &= visible[:, :, None, None]  # (b, t, s, s)
    fg = colour + uniform(-0.08, 0.08, b, 3)
    bg = uniform(0.0, 0.45, b, 1) + uniform(-0.1, 0.1, b, 3)  # a dull background colour
    video = torch.where(inside[:, :, None], fg[:, None, :, None, None], bg[:, None, :, None, None])
    noise = uniform(0.01, 0.06, b)[:, None, None, None, None]  # its strength, per clip
    video = video + noise * torch.randn(video.shape, generator=g, device=dev)
    return video.clamp(0, 1)


# -----------------------------------------------------------------------------
# Tokens (make_tokenizer: a word-level vocabulary of the texts, or BERT's WordPiece from a vocab.txt); pixels

SYNTHETIC_TEXTS = [caption_text(i) for i in range(len(CAPTIONS))] + list(QUESTIONS.values())  # its vocabulary


class Tokens:
    """Texts to token ids: (ids, mask) of the batch's longest text, at most max_len tokens; and BERT's masking."""

    def __init__(self, tokenizer, max_len):
        self.tok, self.max_len, self.truncated = tokenizer, max_len, 0
        self.tok.enable_truncation(max_len)
        self.tok.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        self.mask_id = tokenizer.token_to_id("[MASK]")
        self.special_ids = tuple(tokenizer.token_to_id(s) for s in ("[PAD]", "[CLS]", "[SEP]"))
        pieces = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.bool)  # WordPiece's "##" continuations
        pieces[[i for w, i in tokenizer.get_vocab().items() if w.startswith("##")]] = True
        self.pieces = pieces if isinstance(tokenizer.model, models.WordPiece) else None

    def __call__(self, texts, device="cpu"):
        enc = self.tok.encode_batch(list(texts))
        self.truncated += sum(bool(e.overflowing) for e in enc)  # texts cut to max_len, so far
        ids = torch.tensor([e.ids for e in enc], device=device)
        return ids, torch.tensor([e.attention_mask for e in enc], device=device)

    def mask_words(self, ids, mask, vocab_size, generator):
        """BERT masking (allinone.mlm_mask), of whole words with a WordPiece vocabulary, as the official pre-training
        does: a word's "##" pieces are masked with it."""
        continues = None if self.pieces is None else self.pieces.to(ids.device)[ids]
        return mlm_mask(ids, mask, vocab_size, mask_id=self.mask_id, special_ids=self.special_ids, continues=continues,
                        generator=generator)


NORMS = {  # preprocess -> per-channel mean and std of pixels in [0, 1]
    "ours": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1]
    "official": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's, as the official video pipeline
}


def normalize(video, preprocess):
    """Model input from pixels: uint8, or float in [0, 1]; (..., 3, H, W)."""
    x = video.float() / 255 if video.dtype == torch.uint8 else video
    mean, std = (to_device(torch.tensor(v)[:, None, None], x.device) for v in NORMS[preprocess])
    return (x - mean) / std


def to_device(x, device):
    """A tensor on the device: from the CPU to a GPU through pinned memory, without waiting (a copy from pageable
    memory waits until the GPU has done all it was given); one made on the device already stays."""
    if x.device.type == "cpu" and torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# -----------------------------------------------------------------------------
# Objectives: one module per task, from a batch to its losses (one forward call, as DistributedDataParallel needs)


class Pretrain(nn.Module):
    """Video-text matching and masked language modelling (joint passes), contrastive losses (unimodal passes)."""

    trains = ("vtm_head", "mlm_head", "text_proj", "video_proj")

    def __init__(self, model, temperature):
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, batch):
        m, out = self.model, {}
        # VTM: a joint pass over matched and mismatched pairs, with the VTM head on the pooled text [CLS]
        k = len(batch["vtm_ids"])  # the first k clips
        logits = m.vtm_head(m(batch["video"][:k], batch["vtm_ids"], batch["vtm_mask"]).pooled).float()
        out["vtm"] = vtm_loss(logits, batch["vtm_labels"])
        out["vtm_acc"] = strictly_best(logits, batch["vtm_labels"]).float().mean()
        # MLM: a separate joint pass with masked captions, as in the official code (masking only in matched VTM
        # pairs would leak the label: "has a [MASK]" would mean "matches")
        if "mlm_ids" in batch:
            k = len(batch["mlm_ids"])
            logits = m.mlm_head(m(batch["video"][:k], batch["mlm_ids"], batch["mlm_mask"]).text)
            out["mlm"] = mlm_loss(logits, batch["mlm_labels"]) * batch.get("mlm_share", 1)  # see micro_batches
        # Contrastive (unimodal passes): the video alone against the texts alone
        video = m.video_proj(m.encode_video(batch["video"]).video[:, 0])  # (b, contrastive_dim)
        text = m.text_proj(m.encode_text(batch["text_ids"], batch["text_mask"]).text[:, 0])
        labels = None
        if "bank_targets" in batch:  # text holds every caption there is: each clip must pick its own among all
            out["bank"] = F.cross_entropy(cosine_similarity(video, text) / self.temperature, batch["bank_targets"])
            text, labels = text[batch["bank_targets"]], gather(batch["bank_targets"])  # clips of one caption: pairs
        out["itc"] = contrastive_loss(gather(text), gather(video), self.temperature, labels)  # gather: all processes
        out["loss"] = sum(value for name, value in out.items() if not name.endswith("_acc"))
        return out


class MultipleChoice(nn.Module):
    """mc_head scores each (clip, option) pair (it starts as the VTM "match" row); cross-entropy over the k scores."""

    trains = ("mc_head",)

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        scores = self.model.score_options(batch["video"], batch["options_ids"], batch["options_mask"]).float()
        return dict(loss=F.cross_entropy(scores, batch["answer"]),
                    mc_acc=strictly_best(scores, batch["answer"]).float().mean())


class OpenQA(nn.Module):
    """The QA head (official vqa_classifier) on the pooled joint feature of (clip, question); cross-entropy over the
    answer vocabulary, as the official compute_openend_vqa."""

    trains = ("qa_head",)

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        m = self.model
        logits = m.qa_head(m(batch["video"], batch["question_ids"], batch["question_mask"]).pooled).float()
        return dict(loss=F.cross_entropy(logits, batch["answer"]),
                    qa_acc=strictly_best(logits, batch["answer"]).float().mean())


def objective_for(opts, model):
    if opts.task == "mc":
        return MultipleChoice(model)
    if opts.task == "qa":
        return OpenQA(model)
    return Pretrain(model, opts.temperature)


class GatherRows(torch.autograd.Function):
    """Every process's rows, in rank order. Each process computes the same loss over all rows, so the gradient of its
    own rows is the sum of what every process finds for them."""

    @staticmethod
    def forward(ctx, x):
        rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, x.contiguous())
        return torch.cat(rows)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x):  # all processes' rows, with gradients (x itself without torchrun)
    return GatherRows.apply(x) if dist.is_initialized() else x


# -----------------------------------------------------------------------------
# Synthetic data: training batches and held-out sets for each task. What the loop takes as data (examples/
# train_videos.py's Clips is the other kind): made from the options, it gives the texts of a word-level vocabulary and
# the QA answers; prepare() hands it the model's config and tokens; then batches(start) and held_out().


class Synthetic:
    """Clips rendered on the fly on the training device. Step k's global batch is the same in every run and for any
    number of processes: process r takes its clips r, r + world, r + 2 world, ... (and as many of the VTM and MLM
    clips, which come first)."""

    shared = ("text_ids", "text_mask")  # the caption bank: every process sees all of it
    skipped = None  # clips that failed to load: none here

    def __init__(self, opts, rank=0, world=1):
        self.opts, self.rank, self.world = opts, rank, world
        self.time_variants = torch.tensor([time_variants(i) for i in range(len(CAPTIONS))])  # (72, 6)
        self.looks_variants = torch.tensor([looks_variants(i) for i in range(len(CAPTIONS))])  # (72, 5)
        self.answers = torch.tensor([[ANSWERS.index(answer_to(i, q)) for q in QUESTIONS] for i in range(len(CAPTIONS))])

    def texts(self):
        return SYNTHETIC_TEXTS

    def answer_vocabulary(self):
        return list(ANSWERS)

    def prepare(self, opts, cfg, tokens, preprocess, answers, device):
        self.opts, self.cfg, self.tokens, self.preprocess, self.device = opts, cfg, tokens, preprocess, device
        self.bank_ids, self.bank_mask = tokens([caption_text(i) for i in range(len(CAPTIONS))])
        self.question_ids, self.question_mask = tokens(list(QUESTIONS.values()))
        return self

    def batches(self, start):
        for step in range(start, self.opts.steps):
            yield self.batch(step)

    def batch(self, step):
        g = torch.Generator().manual_seed(hash((self.opts.seed, step)) % 2**62)
        captions = torch.randint(len(CAPTIONS), (self.opts.batch,), generator=g)
        make = {"pretrain": self.pretrain_batch, "mc": self.mc_batch, "qa": self.qa_batch}[self.opts.task]
        batch = make(captions, step, g)
        pixels = torch.Generator(self.device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        video = render(captions.tolist(), self.cfg.frames, self.cfg.image_size, pixels)
        batch["video"] = normalize(video, self.preprocess)
        return {k: to_device(v if k in self.shared else v[self.rank:: self.world], self.device) for k, v in batch.items()}

    def pretrain_batch(self, captions, step, g):
        opts, n = self.opts, len(CAPTIONS)
        k, own = opts.vtm_clips, captions[: opts.vtm_clips]  # the VTM pass takes the first k clips
        matched = torch.randperm(k, generator=g) < k // 2  # a random half keeps its caption
        # A mismatched clip gets, during the curriculum, mostly a caption that differs only in the time words (only
        # the order of the frames tells them apart); otherwise, as often, one that differs only in the colour or only
        # in the shape, or any other caption.
        time_wrong = self.time_variants[own, torch.randint(1, 6, (k,), generator=g)]  # one of its 5 time variants
        looks_wrong = self.looks_variants[own, torch.randint(0, 5, (k,), generator=g)]  # one of its 5 looks variants
        any_wrong = (own + torch.randint(1, n, (k,), generator=g)) % n  # any caption but its own
        other = torch.where(torch.rand(k, generator=g) < 0.5, looks_wrong, any_wrong)
        share = opts.temporal_negatives * (1 if step < opts.curriculum * opts.horizon else 0.5)
        wrong = torch.where(torch.rand(k, generator=g) < share, time_wrong, other)
        vtm = torch.where(matched, own, wrong)
        # contrastive: the text side is the whole caption bank; each clip's target is its caption
        batch = dict(vtm_ids=self.bank_ids[vtm], vtm_mask=self.bank_mask[vtm], vtm_labels=matched.long(),
                     text_ids=self.bank_ids, text_mask=self.bank_mask, bank_targets=captions)
        if opts.mlm_clips:  # the MLM pass: the first clips' own captions, masked
            ids, mask = self.bank_ids[captions[: opts.mlm_clips]], self.bank_mask[captions[: opts.mlm_clips]]
            masked, labels = self.tokens.mask_words(ids, mask, self.cfg.vocab_size, g)
            # and every caption's time word (its last token): only the order of the frames tells it, so the
            # joint pass learns to read time from the first steps instead of waiting for VTM's time mismatches
            rows, last = torch.arange(len(ids)), mask.sum(1) - 2
            masked[rows, last], labels[rows, last] = self.tokens.mask_id, ids[rows, last]
            batch["mlm_ids"], batch["mlm_labels"], batch["mlm_mask"] = masked, labels, mask
        return batch

    def option_sets(self, captions, time_only, g):
        """Five options per clip, its own caption at a random place among four of the five captions that differ from
        it only in the time words (where time_only), or four other captions of any kind. -> (b, 5) captions, answers"""
        b = len(captions)
        # k distinct items drawn at random = the k smallest of random lots (argsort), its own caption's lot made largest
        lots = torch.rand(b, len(CAPTIONS), generator=g)
        lots[torch.arange(b), captions] = 2
        anything = lots.argsort(1)[:, :4]
        times = self.time_variants[captions, 1:].gather(1, torch.rand(b, 5, generator=g).argsort(1)[:, :4])
        options = torch.cat([captions[:, None], torch.where(time_only[:, None], times, anything)], 1)
        order = torch.rand(b, 5, generator=g).argsort(1)  # a random order of the five
        return options.gather(1, order), order.argmin(1)  # the answer: where column 0, the own caption, went

    def mc_batch(self, captions, step, g):
        options, answer = self.option_sets(captions, torch.rand(len(captions), generator=g) < 0.5, g)
        return dict(options_ids=self.bank_ids[options], options_mask=self.bank_mask[options], answer=answer)

    def qa_batch(self, captions, step, g):
        kind = torch.randint(len(QUESTIONS), (len(captions),), generator=g)
        return dict(question_ids=self.question_ids[kind], question_mask=self.question_mask[kind],
                    answer=self.answers[captions, kind])

    def held_out(self):
        """New renders from a seed no training batch uses, as uint8, with what the task evaluates on them."""
        g = torch.Generator().manual_seed(10_000_019 + self.opts.seed)
        captions = torch.randint(len(CAPTIONS), (self.opts.eval_clips,), generator=g)
        video = render(captions.tolist(), self.cfg.frames, self.cfg.image_size, g)
        return self.held_out_of(captions, (video * 255).round().to(torch.uint8), g)

    def held_out_of(self, captions, video, g):
        n, clips = len(captions), torch.arange(len(captions))
        held, ids, mask = HeldOut(video), self.bank_ids, self.bank_mask
        if self.opts.task == "pretrain":  # each clip's caption, its time-swapped caption; its 6 time variants
            swapped = self.time_variants[captions, 1]
            held.captions = Captions(ids[captions], mask[captions], first=clips, label=captions, clip_label=captions,
                                     text=captions, swapped_ids=ids[swapped], swapped_mask=mask[swapped])
            options = self.time_variants[captions]  # the answer, its own caption, first
            held.choices["mc_acc"] = Choices(ids[options], mask[options], clips, torch.zeros(n, dtype=torch.long))
        if self.opts.task == "mc":  # 5 options of any kind; 5 that differ only in the time words
            for name, time_only in (("mc_acc", False), ("mc_acc_time", True)):
                options, answer = self.option_sets(captions, torch.full((n,), time_only), g)
                held.choices[name] = Choices(ids[options], mask[options], clips, answer)
        if self.opts.task == "qa":  # every question about every clip
            kind, clip = torch.arange(len(QUESTIONS)).repeat(n), clips.repeat_interleave(len(QUESTIONS))
            held.questions = Questions(self.question_ids[kind], self.question_mask[kind], clip,
                                       self.answers[captions[clip], kind], kind, list(QUESTIONS))
        return held


# -----------------------------------------------------------------------------
# The training loop: one for every task, on synthetic clips or (examples/train_videos.py) your own


def train(opts, Data=Synthetic):
    """Pre-train or fine-tune as the options say, on Data's clips; returns the last evaluation's metrics (None on the
    other processes under torchrun)."""
    rank, world = start_processes(opts)  # under torchrun: one process per GPU
    device = pick_device(opts.device)
    autocast, scaler = mixed_precision(device, opts.precision)  # bf16, fp16 with a loss scaler, or fp32
    say = print if rank == 0 else lambda *args, **kwargs: None
    with RunFolder(opts, main=rank == 0) as folder:
        opts, model, data, ckpt = setup(opts, device, Data, rank, world)
        check_divides(opts, world)
        objective = objective_for(opts, model)
        trained = [h for h in objective.trains if h != "mlm_head" or opts.mlm_clips]  # the heads this task trains
        ckpt.untrained = sorted(set(ckpt.untrained) - set(trained))
        if ckpt.untrained:
            say(f"heads this run does not train, never trained before: {', '.join(ckpt.untrained)}")
        optimizer, params = make_optimizer(model, trained, opts, device)  # the other heads are frozen
        if rank:  # dropout: each process its own masks (process 0 goes on as a run of one process does)
            torch.manual_seed(hash((opts.seed, rank)) % 2**62)
        if ckpt.optimizer:  # resuming: the optimizer, the loss scaler and the random state as they were saved
            optimizer.load_state_dict(ckpt.optimizer)
            if ckpt.scaler:  # (empty from an fp32 or bf16 run, which another device may resume in fp16)
                scaler.load_state_dict(ckpt.scaler)
            set_rng_state(ckpt.rng, rank)
        model.train()
        step_fn = distributed(objective, world, opts.compile)  # DDP under torchrun; torch.compile with --compile
        held = data.held_out() if rank == 0 else None
        curve_held = held.first(opts.curve_clips) if rank == 0 else None  # what --curve-every evaluates on
        start = step = logged = folder.saved = ckpt.step
        if step >= opts.steps:
            raise BadInput(f"--steps {opts.steps}: the run in {opts.out} is at step {step} already")
        say(summary(opts, model, device, world, start, folder))
        clock, totals, last, flops = Clock(device), {}, None, None
        first_bad = torch.full((), -1, device=device)  # the first step whose loss was not finite, noted on the device
        try:
            for batch in data.batches(step):
                for group in optimizer.param_groups:  # warm-up, then cosine decay
                    group["lr"] = lr_at(step, opts) * group["lr_mult"]
                bad = torch.zeros((), dtype=torch.bool, device=device)
                for i, micro in enumerate(micro_batches(batch, opts.accum, data.shared)):  # --accum N: N slices
                    with autocast, grad_sync(step_fn, i == opts.accum - 1):  # DDP syncs the last one's gradients
                        out = step_fn(micro)
                    scaler.scale(out["loss"] / opts.accum).backward()
                    bad |= ~torch.isfinite(out["loss"].detach())
                    for name, value in out.items():
                        totals[name] = totals.get(name, 0) + value.detach().float() / opts.accum
                scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(params, opts.clip_grad)
                scaler.step(optimizer)  # skips the step when fp16 gradients overflowed, and lowers the scale
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                # the NaN guard, without waiting for the device: a non-finite loss, or gradient where no scaler skips
                bad |= ~torch.isfinite(norm) & (not scaler.is_enabled())
                first_bad = torch.where((first_bad < 0) & bad, step, first_bad)
                if step % opts.log_every == 0 or step == opts.steps:
                    stop_if_not_finite(first_bad, folder)
                    say(log_line(step, opts, totals, step - logged, (step - start) * opts.batch / clock.training(),
                                 data.skipped), flush=True)
                    totals, logged = {}, step
                evaluating = step % opts.eval_every == 0 or step == opts.steps
                if evaluating or step % opts.ckpt_every == 0:  # before evaluating: a crash there loses nothing
                    with clock.paused():
                        save_checkpoint(folder, ckpt, model, optimizer, scaler, step, first_bad)
                if evaluating:
                    with clock.paused():
                        flops = flops or count_flops(objective, micro, autocast) / len(micro["video"])
                        if rank == 0:
                            metrics = evaluate(model, held, data.tokens, autocast, ckpt.preprocess, ckpt.untrained,
                                               order_test=opts.order_test, chunk=opts.batch // opts.accum)
                    if rank == 0:
                        last = report(folder, opts, model.cfg, step, metrics, data, clips_per_s=(step - start) * opts.batch
                                      / clock.training(), wall_s=clock.wall(), flops_per_clip=flops)
                # a point of the learning curves, where no full evaluation runs (its row is the point there)
                elif opts.curve_every and step % opts.curve_every == 0:
                    stop_if_not_finite(first_bad, folder)
                    if rank == 0:  # as the full evaluation: rank 0 alone, the others wait in the next collective
                        with clock.paused():
                            metrics, _ = evaluate(model, curve_held, data.tokens, autocast, ckpt.preprocess,
                                                  ckpt.untrained, chunk=opts.batch // opts.accum)
                        row = dict(kind="curve", step=step, task=opts.task, temporal=model.cfg.temporal, **metrics)
                        append_line(folder.path / "metrics.jsonl", json.dumps(row))
        except KeyboardInterrupt:
            save_checkpoint(folder, ckpt, model, optimizer, scaler, step, first_bad)
            say(f"\ninterrupted at step {step}: saved {folder.ckpt}; --resume continues")
            raise SystemExit(130)
    say(f"done: {step - start} steps in {clock.wall() / 60:.1f} min; {folder.ckpt}")
    return last


def lr_at(step, opts):
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(1, opts.horizon - opts.warmup))
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_batches(batch, n, shared=()):
    """--accum n: this process's batch as n micro-batches, micro-batch j the clips j, j + n, ... (so each keeps its
    share of the VTM and MLM clips, which come first; the keys in shared, the caption bank, go to each whole). Each
    micro-batch's MLM loss is weighted (mlm_share) by its share of the masked words of the whole step over every
    process, so that the losses, averaged over micro-batches and processes, are the MLM loss of the whole batch."""
    total = (batch["mlm_labels"] != -100).sum() if "mlm_labels" in batch else None
    if total is not None and dist.is_initialized():
        dist.all_reduce(total)
    world = dist.get_world_size() if dist.is_initialized() else 1
    for j in range(n):
        micro = {k: v if k in shared else v[j::n] for k, v in batch.items()}
        if total is not None:
            micro["mlm_share"] = (micro["mlm_labels"] != -100).sum() * n * world / total.clamp(min=1)
        yield micro


def grad_sync(step_fn, sync):
    """Under DDP, backward averages the gradients over the processes: only where sync (a step's last micro-batch)."""
    ddp = getattr(step_fn, "_orig_mod", step_fn)  # under --compile, the compiled module's
    if sync or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def log_line(step, opts, totals, steps, clips_per_s, skipped):
    """step | loss (its parts) | learning rate | speed | time left, from the sums of the last `steps` steps."""
    mean = {k: v.item() / steps for k, v in totals.items()}
    parts = " ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "loss")
    return (f"step {step:5d}/{opts.steps} | loss {mean['loss']:.3f} ({parts}) | lr {lr_at(step - 1, opts):.1e} | "
            f"{clips_per_s:.0f} clips/s | ETA {(opts.steps - step) * opts.batch / clips_per_s / 60:.1f} min"
            + (f" | skipped {skipped.count} clips" if skipped else ""))


def stop_if_not_finite(first_bad, folder, model=None, step=None):
    """Stop the run, before a checkpoint or a number is written, at the first non-finite loss (first_bad: its step,
    -1 for none) or weight: the last good checkpoint stays."""
    bad = int(first_bad)
    if bad < 0 and model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
        bad = step
    if bad >= 0:
        kept = f"{folder.ckpt} is from before it" if folder.ckpt.exists() else "no checkpoint was written"
        raise BadInput(f"step {bad}: the loss or the weights are not finite (NaN or inf): stopped; {kept}. "
                       "A smaller --lr, or a larger --temperature, may help")


def save_checkpoint(folder, ckpt, model, optimizer, scaler, step, first_bad):
    """OUT/ckpt.pt with the run's state at this step, written atomically by the main process, once every loss so far
    and every weight is finite."""
    stop_if_not_finite(first_bad, folder, model, step)
    rng = [rng_state()]
    if dist.is_initialized():  # every process's random state, in rank order
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state())
    if folder.main:
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                     rng=rng)
        try:
            write_file(folder.ckpt, lambda f: torch.save(vars(dataclasses.replace(ckpt, **state)), f))
        except BadInput as e:
            kept = (f"{folder.ckpt} of step {folder.saved} is kept: --resume continues from it once there is space"
                    if folder.ckpt.exists() else "no checkpoint of this run was written")
            raise BadInput(f"step {step}: {e}; {kept}") from None
        folder.saved = step


# -----------------------------------------------------------------------------
# Evaluation, the way papers report it: held-out sets, and one short function per kind of metric


@dataclass
class Captions:
    """Held-out captions, for VTM, MLM and retrieval, in clip order: clip i's before clip i + 1's."""
    ids: torch.Tensor  # (captions, l) token ids
    mask: torch.Tensor  # (captions, l) 1 = a real token
    first: torch.Tensor  # (clips,) each clip's first caption, the one VTM and MLM pair it with
    label: torch.Tensor  # (captions,) a caption belongs to the clips whose clip_label is its label
    clip_label: torch.Tensor  # (clips,) data files: the clip's index; synthetic: its caption's index in the bank
    text: torch.Tensor  # (captions,) which distinct text each caption is (VTM's wrong caption is another text)
    swapped_ids: Optional[torch.Tensor] = None  # (clips, l) synthetic: each clip's caption with its time words
    swapped_mask: Optional[torch.Tensor] = None  # swapped, which only the order of the frames tells apart


@dataclass
class Choices:
    """A multiple-choice set: each row is a clip and k options, one of them right."""
    ids: torch.Tensor  # (rows, k, l)
    mask: torch.Tensor  # (rows, k, l)
    clip: torch.Tensor  # (rows,) the clip each row asks about
    answer: torch.Tensor  # (rows,) the index of the right option


@dataclass
class Questions:
    """Open-ended questions, answered from the answer vocabulary."""
    ids: torch.Tensor  # (rows, l)
    mask: torch.Tensor  # (rows, l)
    clip: torch.Tensor  # (rows,) the clip each question asks about
    answer: torch.Tensor  # (rows,) the right answer's index in the vocabulary; -1: outside it (always wrong)
    kind: torch.Tensor  # (rows,) the question's type, an index in kinds (-1: none)
    kinds: list  # type names: qa_acc_<name> is the accuracy on questions of that type


@dataclass
class HeldOut:
    """A held-out set: its clips, decoded once, and what the task evaluates on them."""
    video: torch.Tensor  # (clips, t, 3, H, W) uint8
    captions: Optional[Captions] = None  # pre-training: VTM, MLM, retrieval
    choices: dict = field(default_factory=dict)  # metric name -> Choices: multiple choice
    questions: Optional[Questions] = None  # open-ended QA

    def first(self, n):
        """The set of its first n clips: their captions (those before clip n's first), choices and questions."""
        if n >= len(self.video):
            return self
        c = self.captions
        if c is not None:
            k = int(c.first[n])
            c = Captions(c.ids[:k], c.mask[:k], c.first[:n], c.label[:k], c.clip_label[:n], c.text[:k],
                         *(None if x is None else x[:n] for x in (c.swapped_ids, c.swapped_mask)))
        choices = {name: Choices(*(x[s.clip < n] for x in (s.ids, s.mask, s.clip, s.answer)))
                   for name, s in self.choices.items()}
        q = self.questions
        if q is not None:
            q = Questions(*(x[q.clip < n] for x in (q.ids, q.mask, q.clip, q.answer, q.kind)), q.kinds)
        return HeldOut(self.video[:n], c, choices, q)


@torch.no_grad()
def evaluate(model, held, tokens, autocast, preprocess, untrained=(), progress=False, order_test=False, chunk=256):
    """Held-out metrics (README: what the metrics mean) and notes on the metrics left out and why. order_test: the
    main metrics again with each clip's frames reversed, then shuffled (t2v_r1_reversed, ...)."""
    training, untrained, notes = model.training, set(untrained), []
    model.eval()
    p = Passes(model, held.video, autocast, preprocess, progress, chunk)
    metrics = {"clips": len(held.video), **metrics_of(p, held, tokens, untrained, notes)}
    if order_test:
        for name, order in frame_orders(p.frames).items():
            again = metrics_of(p.reordered(order), held, tokens, untrained, [])
            metrics.update({f"{k}_{name}": v for k, v in again.items() if k in ORDER_TEST})
    model.train(training)
    return metrics, notes


ORDER_TEST = ("t2v_r1", "v2t_r1", "vtm_acc", "mc_acc", "qa_acc")  # what --order-test reports again


def metrics_of(p, held, tokens, untrained, notes):
    """Every metric the held-out set has data for, but those scored by a head that was never trained (noted)."""
    scorer = "mc_head" if p.model.cfg.mc_head else "vtm_head"  # multiple choice: zero-shot, the VTM match logit
    c, metrics, kinds = held.captions, {}, []  # kinds: (name, the output heads it scores with, its function)
    if c is not None:
        metrics["captions"] = len(c.ids)
        kinds += [("vtm_acc", {"vtm_head"}, lambda: vtm_metrics(p, c, notes)),
                  ("mlm_acc", {"mlm_head"}, lambda: mlm_metrics(p, c, tokens, notes)),
                  ("retrieval", {"text_proj", "video_proj"}, lambda: retrieval(p, c, notes))]
    kinds += [(name, {scorer}, lambda name=name, s=s: choice_metrics(p, name, s)) for name, s in held.choices.items()]
    if held.questions is not None:
        kinds.append(("qa_acc", {"qa_head"}, lambda: qa_metrics(p, held.questions)))
    for name, scorers, compute in kinds:
        if scorers & untrained:
            notes.append(f"{name} left out: {' and '.join(sorted(scorers & untrained))} never trained (chance numbers)")
        else:
            metrics.update(compute())
    return metrics


def vtm_metrics(p, c, notes):
    """vtm_acc: each clip with one of its captions (right: "match") and with a caption of another clip that is another
    text ("no match"); synthetic, vtm_acc_temporal: the wrong caption is its own with the time words swapped."""
    other = (c.label[None] != c.clip_label[:, None]) & (c.text[None] != c.text[c.first][:, None])  # (clips, captions)
    if not other.any():
        notes.append("vtm_acc left out: it needs a caption of another held-out clip, with another text")
        return {}
    clips, has = torch.arange(len(c.first)), other.any(1)
    lots = torch.rand(other.shape, generator=torch.Generator().manual_seed(1)).masked_fill(~other, -1)
    pick = lots.argmax(1)[has]  # for each clip, one of those captions at random (a fixed seed)
    own = vtm_logits(p, clips, c.ids[c.first], c.mask[c.first])
    wrong = vtm_logits(p, clips[has], c.ids[pick], c.mask[pick])
    metrics = dict(vtm_acc=(said(own, 1).mean() + said(wrong, 0).mean()).item() / 2)
    if c.swapped_ids is not None:
        swapped = vtm_logits(p, clips, c.swapped_ids, c.swapped_mask)
        metrics["vtm_acc_temporal"] = (said(own, 1).mean() + said(swapped, 0).mean()).item() / 2
        if p.order is None:
            metrics.update(order_test(p, c, own, swapped))
    return metrics


def vtm_logits(p, clip, ids, mask):  # (pairs, 2): the VTM head on the joint pass of each (clip[i], ids[i])
    return p.joint("VTM", clip, ids, mask, lambda out, s: p.model.vtm_head(out.pooled))


def own_and_swapped(p, c):  # synthetic: each clip's VTM logits with its own caption, and with its time-swapped one
    clips = torch.arange(len(c.first))
    return vtm_logits(p, clips, c.ids[c.first], c.mask[c.first]), vtm_logits(p, clips, c.swapped_ids, c.swapped_mask)


def said(logits, label):  # 1 where the VTM head said label (1 match, 0 no match) and meant it
    return strictly_best(logits, torch.full((len(logits),), label)).float()


def order_test(p, c, own, swapped):
    """The frame-order test (synthetic): a clip's decision is whether its own caption's match logit is above its
    time-swapped caption's; order_flip is the share of clips whose decision changes when their frames are reversed
    (a model that reads order flips them all: reversed "moves left" is "moves right"). vtm_acc_temporal_shuffled:
    vtm_acc_temporal with the frames in a fixed shuffled order."""
    orders = frame_orders(p.frames)
    rev_own, rev_swapped = own_and_swapped(p.reordered(orders["reversed"]), c)
    flipped = (own[:, 1] > swapped[:, 1]) != (rev_own[:, 1] > rev_swapped[:, 1])
    metrics = dict(order_flip=flipped.float().mean().item())
    if "shuffled" in orders:
        own, swapped = own_and_swapped(p.reordered(orders["shuffled"]), c)
        metrics["vtm_acc_temporal_shuffled"] = (said(own, 1).mean() + said(swapped, 0).mean()).item() / 2
    return metrics


def mlm_metrics(p, c, tokens, notes):
    """mlm_acc: BERT masking of each clip's caption with a fixed seed; right where the true word scores above all."""
    ids, mask = c.ids[c.first], c.mask[c.first]
    masked, labels = tokens.mask_words(ids, mask, p.model.cfg.vocab_size, torch.Generator().manual_seed(2))
    picked = labels != -100
    if not picked.any():
        notes.append("mlm_acc left out: no held-out caption has a word to mask")
        return {}
    dev = p.device
    right = p.joint("MLM", torch.arange(len(ids)), masked, mask, lambda out, s: strictly_best(
        p.model.mlm_head(out.text)[picked[s].to(dev)], labels[s][picked[s]].to(dev)))
    return dict(mlm_acc=right.mean().item())


def retrieval(p, c, notes):
    """Dual-stream retrieval, as MSR-VTT reports it: text-only against video-only features, by cosine similarity;
    a caption's hit is its clip (synthetic: any clip of its caption), a clip's hit any of its captions."""
    if len(p.video) < 2:
        notes.append("retrieval left out: it needs two held-out clips")
        return {}
    m, dev = p.model, p.device
    text = p.run("text", len(c.ids),
                 lambda s: m.text_proj(m.encode_text(c.ids[s].to(dev), c.mask[s].to(dev)).text[:, 0]))
    video = p.run("video", len(p.video), lambda s: m.video_proj(m.encode_video(p.clips(s)).video[:, 0]))
    sim, hits = cosine_similarity(text, video), c.label[:, None] == c.clip_label[None]  # (captions, clips)
    t2v, v2t = first_hit_ranks(sim, hits), first_hit_ranks(sim.T, hits.T)
    return {**recall_metrics(t2v, "t2v"), **recall_metrics(v2t, "v2t")}


def choice_metrics(p, name, choices):
    """Multiple choice: the right option must score above every other (mc_head, or zero-shot the VTM match logit)."""
    k, dev = choices.ids.shape[1], p.device
    scores = p.run("options", len(choices.ids), lambda s: p.model.score_options(
        p.clips(choices.clip[s]), choices.ids[s].to(dev), choices.mask[s].to(dev)), chunk=max(1, p.chunk // k))
    return {name: strictly_best(scores, choices.answer).float().mean().item()}


def qa_metrics(p, q):
    """qa_acc overall and per question type; an answer outside the vocabulary counts as wrong."""
    logits = p.joint("QA", q.clip, q.ids, q.mask, lambda out, s: p.model.qa_head(out.pooled))
    right = (strictly_best(logits, q.answer.clamp(min=0)) & (q.answer >= 0)).float()
    metrics = dict(qa_acc=right.mean().item())
    for i, kind in enumerate(q.kinds):
        if (q.kind == i).any():
            metrics[f"qa_acc_{kind}"] = right[q.kind == i].mean().item()
    metrics["qa_unknown_answers"] = (q.answer < 0).float().mean().item()
    return metrics


class Passes:
    """The model's passes over held-out clips: in chunks, under autocast, gathered on the CPU in float32."""

    def __init__(self, model, video, autocast, preprocess, progress=False, chunk=256, order=None):
        self.model, self.video, self.autocast, self.preprocess = model, video, autocast, preprocess
        self.progress, self.chunk, self.order, self.device = progress, chunk, order, next(model.parameters()).device
        self.frames = video.shape[1]

    def reordered(self, order):  # the same passes with every clip's frames in this order
        return Passes(self.model, self.video, self.autocast, self.preprocess, self.progress, self.chunk, order)

    def run(self, what, n, fn, chunk=None):  # fn(slice) over the chunks of range(n), concatenated
        chunk, meter, out = chunk or self.chunk, Progress(f"eval {what}", n, self.progress), []
        for s in range(0, n, chunk):
            with self.autocast:
                out.append(fn(slice(s, s + chunk)).float().cpu())
            meter(min(chunk, n - s))
        return torch.cat(out)

    def clips(self, index):  # model input for the clips at index: (len, t, 3, H, W), frames in self.order
        video = self.video[index] if self.order is None else self.video[index][:, self.order]
        return normalize(video.to(self.device), self.preprocess)

    def joint(self, what, clip, ids, mask, head):  # head(Output, slice) of the joint pass of each (clip[i], ids[i])
        return self.run(what, len(ids), lambda s: head(
            self.model(self.clips(clip[s]), ids[s].to(self.device), mask[s].to(self.device)), s))


def frame_orders(t):
    """The orders of the order test: the frames reversed, and (from 3 frames) a fixed shuffle that is neither the
    identity nor the reversal."""
    orders, g = {"reversed": torch.arange(t - 1, -1, -1)}, torch.Generator().manual_seed(0)
    while t >= 3 and "shuffled" not in orders:
        order = torch.randperm(t, generator=g)
        if not (torch.equal(order, torch.arange(t)) or torch.equal(order, orders["reversed"])):
            orders["shuffled"] = order
    return orders


def report(folder, opts, cfg, step, evaluated, data, **extra):
    """An evaluation: its notes and metrics printed, its row added to OUT/metrics.jsonl, and returned."""
    metrics, notes = evaluated
    for note in notes:
        print(f"note: {note}")
    row = dict(step=step, task=opts.task, temporal=cfg.temporal, **metrics, **extra)
    if data.skipped:
        row.update(skipped_clips=data.skipped.count, truncated_captions=data.tokens.truncated)
    append_line(folder.path / "metrics.jsonl", json.dumps(row))
    if opts.eval_only:
        print("\n".join(f"{k:>22}  {v:.4f}" if isinstance(v, float) else f"{k:>22}  {v}" for k, v in row.items()))
    else:
        print("eval " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return row


# -----------------------------------------------------------------------------
# main: a training run, --eval-only or --ablation


def main(argv=None):
    opts = parse_options(argv)  # a bad option: argparse's one-line error
    with one_line_errors():
        run(opts, Synthetic)


def run(opts, Data):
    if opts.eval_only:
        return evaluate_only(opts, Data)
    return ablation(opts, Data) if opts.ablation else train(opts, Data)


def evaluate_only(opts, Data=Synthetic):
    """--eval-only: the --resume or --init model on the held-out set, printed as a table and added to metrics.jsonl."""
    if int(os.environ.get("RANK", 0)):  # under torchrun, one process evaluates
        return None
    device = pick_device(opts.device)
    with RunFolder(opts) as folder:
        opts, model, data, ckpt = setup(opts, device, Data)
        print(summary(opts, model, device, 1, ckpt.step if opts.resume else None, folder))
        metrics = evaluate(model, data.held_out(), data.tokens, mixed_precision(device, opts.precision)[0],
                           ckpt.preprocess, ckpt.untrained, progress=True, order_test=opts.order_test,
                           chunk=opts.batch // opts.accum)
        return report(folder, opts, model.cfg, ckpt.step, metrics, data, eval_only=True,
                      checkpoint=str(folder.ckpt if opts.resume else opts.init))


def ablation(opts, Data=Synthetic):
    """--ablation: --temporal roll, none and flatten with the same options and budget, then one table."""
    rows = []
    for mode in ("roll", "none", "flatten"):
        print(f"\n=== --temporal {mode} ===")
        rows.append(train(dataclasses.replace(opts, temporal=mode, out=str(Path(opts.out) / mode)), Data))
    if None in rows:  # under torchrun, the other processes: they evaluate nothing
        return rows
    keys = ["vtm_acc", "vtm_acc_temporal", "order_flip", "mc_acc", "mlm_acc", "t2v_r1", "t2v_r5", "v2t_r1", "clips_per_s",
            "flops_per_clip", "wall_s"]
    keys = [k for k in keys if all(k in r for r in rows)]
    print(f"\n{'temporal':10}" + "".join(f"{k:>17}" for k in keys))
    for r in rows:
        print(f"{r['temporal']:10}" + "".join(f"{r[k] / 1e6:>13.1f} MFL" if k == "flops_per_clip" else f"{r[k]:17.3f}"
                                              for k in keys))
    return rows


# =====================================================================================================================
# What the run above calls by name; a reader of the method need not go further: option checks and the resume rules,
# start points, checkpoints and the run folder, devices and clocks, FLOP counting, DDP.


class BadInput(ValueError):
    """Bad input: the message names the flag, the file or the line; the command line prints it alone and exits 1."""


@contextlib.contextmanager
def one_line_errors():
    """A command line's body: bad input is one line and exit status 1, no traceback."""
    warnings.filterwarnings("once")
    try:
        yield
    except BadInput as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- options: parsing, checks, and what a resumed run may change


def parse_options(argv=None, Opts=Options):
    p = argparse.ArgumentParser(description=sys.modules[Opts.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Opts):
        if f.type is bool:
            p.add_argument(flag(f.name), action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            default = f.default if f.default is not None else ", ".join(f"{t} {d[f.name]}" for t, d in TASK_DEFAULTS.items())
            p.add_argument(flag(f.name), type=f.type, default=argparse.SUPPRESS,
                           help=f.metadata["help"] + ("" if f.default == "" else f" (default: {default})"))
    given = vars(p.parse_args(argv))  # only the flags on the command line
    opts = Opts(**given)
    if opts.resume:
        opts = resumed_options(p, opts, given)
    else:
        if opts.eval_only and opts.init and "task" not in given:  # a fine-tuned checkpoint says what it was tuned for
            opts.task = trained_task(opts.init)
        opts = dataclasses.replace(opts, **{k: v for k, v in TASK_DEFAULTS.get(opts.task, {}).items() if k not in given})
    check_options(p, opts)
    return opts


def resumed_options(p, opts, given):
    """A resumed run's options are its checkpoint's; a flag that would change the run is an error naming it."""
    path = Path(opts.out) / "ckpt.pt"
    if not path.is_file():
        p.error(f"--resume: no checkpoint at {path}")
    try:
        saved = load_checkpoint(path)
    except ValueError as e:
        p.error(f"--resume: {e}")
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        p.error(f"--resume: {path} is not a train_tiny.py checkpoint")
    fields = {f.name for f in dataclasses.fields(opts)}
    if saved["options"].get("data") and "data" not in fields:
        p.error(f"--resume: the run in {opts.out} trained on your videos: examples/train_videos.py --resume continues it")
    defaults = TASK_DEFAULTS.get(saved["options"].get("task"), {})  # of the options newer than the checkpoint
    saved = {**defaults, **{k: v for k, v in saved["options"].items() if k in fields}}
    free = opts.may_change_on_resume | (opts.may_change_to_evaluate if opts.eval_only else set())
    for name, value in given.items():
        if name not in free and name in saved and value != saved[name]:
            p.error(f"{flag(name)} {value!r} differs from the checkpoint's {saved[name]!r} ({path}): a resumed run keeps "
                    f"its options; only {', '.join(flag(n) for n in sorted(free - {'resume', 'out'}))} may change")
    return type(opts)(**{**saved, **{k: v for k, v in given.items() if k in free}, "restart": False})


def trained_task(path):
    """The --task a train_tiny.py checkpoint was trained for ("pretrain" for anything else)."""
    try:
        return load_checkpoint(path)["options"]["task"]
    except (ValueError, KeyError, TypeError):
        return "pretrain"


def flag(name):
    return "--" + name.replace("_", "-")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_options(p, o):
    """Every check is one line naming the flag: argparse's error, exit status 2."""
    def need(ok, message):
        if not ok:
            p.error(message)

    for name, allowed in (("task", TASKS), ("temporal", ("roll", "none", "flatten")), ("preprocess", ("auto", "ours",
                          "official")), ("device", ("auto", "cuda", "mps", "cpu")), ("precision", ("auto", "fp32",
                          "bf16", "fp16"))):
        value = getattr(o, name)
        need(value in allowed or (name, value) == ("temporal", ""),  # temporal "": the --init checkpoint's, else roll
             f"{flag(name)} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {value!r}")
    for name in ("steps", "horizon", "log_every", "eval_every", "ckpt_every", "eval_clips", "curve_clips", "accum"):
        need(getattr(o, name) >= 1, f"{flag(name)} must be at least 1, got {getattr(o, name)}")
    for name in ("warmup", "frames", "image_size", "attention_heads", "fold_div", "curve_every"):
        need(getattr(o, name) >= 0, f"{flag(name)} must be 0 or more, got {getattr(o, name)}")
    need(o.batch >= 2, "--batch must be at least 2 (VTM and multiple choice need two clips)")
    need(2 <= o.vtm_clips <= o.batch, "--vtm-clips must be between 2 and --batch")
    need(0 <= o.mlm_clips <= o.batch, "--mlm-clips must be between 0 and --batch")
    for name in ("lr", "clip_grad", "temperature"):
        need(finite(getattr(o, name)) and getattr(o, name) > 0, f"{flag(name)} must be a positive number, got "
                                                                f"{getattr(o, name)}")
    need(finite(o.weight_decay) and o.weight_decay >= 0, f"--weight-decay must be 0 or more, got {o.weight_decay}")
    need(finite(o.dropout) and 0 <= o.dropout < 1, f"--dropout must be in [0, 1), got {o.dropout}")
    for name in ("curriculum", "temporal_negatives"):
        need(finite(getattr(o, name)) and 0 <= getattr(o, name) <= 1,
             f"{flag(name)} must be between 0 and 1, got {getattr(o, name)}")
    for name in ("vocab", "init"):
        need(not getattr(o, name) or Path(getattr(o, name)).is_file(), f"{flag(name)} {getattr(o, name)}: no such file")
    need(not (o.image_size and o.init), "--image-size is for runs from scratch; an --init checkpoint fixes the size")
    need(not (o.ablation and (o.resume or o.eval_only)), "--ablation starts three fresh runs")
    need(not (o.resume and o.restart), "--resume continues the run in --out; --restart starts it over: not both")
    need(not o.eval_only or o.resume or o.init, "--eval-only needs a model: --resume (the run in --out) or --init")
    o.checks(need)


def check_divides(opts, world):
    for name in ("batch", "vtm_clips", "mlm_clips"):
        if getattr(opts, name) % (world * opts.accum):
            raise BadInput(f"{flag(name)} {getattr(opts, name)} does not divide among {world} process(es) x --accum "
                           f"{opts.accum} micro-batches")


# --- start points: from scratch, an official checkpoint, --init of ours, --resume


@dataclass
class StartPoint:
    path: Path
    checkpoint: dict  # the file's contents, read without running code from it
    ours: bool  # a train_tiny.py ckpt.pt: config, tokenizer and heads come from it
    resume: bool  # continue its run
    tokenizer: Optional[Tokenizer] = None  # ours: the run's tokenizer


def setup(opts, device, Data=Synthetic, rank=0, world=1):
    """What a run is made of: (opts with what the model settled, the model on the device, the data, and what the
    checkpoint holds: the resumed run's, or new)."""
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(opts.seed)
    start = read_start_point(opts)
    data = Data(opts, rank, world)  # your own videos: their data files are read here
    ours = start is not None and start.ours
    tokenizer = start.tokenizer if ours else make_tokenizer(opts.vocab, data.texts())
    answers = (list(start.checkpoint.get("answers", [])) if ours else []) or (  # the QA classes: a start point's own
        data.answer_vocabulary() if opts.task == "qa" else [])
    model, untrained, opts = build_model(opts, start, tokenizer.get_vocab_size(), len(answers))
    preprocess = preprocess_for(opts, start)
    data.prepare(opts, model.cfg, Tokens(tokenizer, model.cfg.max_text_len), preprocess, answers, device)
    resumed = start.checkpoint if start and start.resume else {}
    ckpt = Checkpoint(config=dataclasses.asdict(model.cfg), options=dataclasses.asdict(opts),
                      tokenizer=tokenizer.to_str(), preprocess=preprocess, answers=answers, untrained=sorted(untrained),
                      **{k: resumed[k] for k in ("optimizer", "scaler", "step", "rng") if k in resumed})
    return opts, model.to(device), data, ckpt


def read_start_point(opts):
    """The checkpoint the run starts from (None: from scratch), read without running code from it."""
    if not (opts.resume or opts.init):
        return None
    path = Path(opts.out) / "ckpt.pt" if opts.resume else Path(opts.init)
    try:
        ckpt = load_checkpoint(path)
    except ValueError as e:
        raise BadInput(f"--{'resume' if opts.resume else 'init'}: {e}") from None
    if not isinstance(ckpt, dict):
        raise BadInput(f"{path}: not a checkpoint (it holds a {type(ckpt).__name__})")
    ours = all(k in ckpt for k in ("model", "config", "tokenizer"))
    if opts.resume and not ours:
        raise BadInput(f"--resume: {path} is not a train_tiny.py checkpoint")
    if not ours and not opts.vocab:
        raise BadInput(f"--init {path} is not a train_tiny.py checkpoint: an official one needs its BERT "
                       "vocabulary, --vocab vocab.txt")
    return StartPoint(path, ckpt, ours, opts.resume, Tokenizer.from_str(ckpt["tokenizer"]) if ours else None)


def preprocess_for(opts, start):
    """Frames as the start point saw them: an official checkpoint the official way, ours as it was trained."""
    if opts.preprocess != "auto" or start is None:
        return "ours" if opts.preprocess == "auto" else opts.preprocess
    return start.checkpoint.get("preprocess", "ours") if start.ours else "official"


def build_model(opts, start, vocab_size, num_answers):
    """The model a run trains: a preset from scratch, or a start point's, with the task's head. Returns (model, the
    heads it holds that were never trained, opts with the model's temporal, fold_div and frames)."""
    task_head = dict(mc_head=True) if opts.task == "mc" else dict(num_answers=num_answers) if opts.task == "qa" else {}
    try:
        if start is not None and start.resume:
            model = AllInOne(Config(**{**start.checkpoint["config"], "checkpointing": opts.checkpointing}))
            model.load_state_dict(start.checkpoint["model"])
            untrained = set(start.checkpoint.get("untrained", ()))
        elif start is not None:
            ckpt = start.checkpoint
            saved = ckpt["config"] if start.ours else {}  # an official checkpoint: the official model's settings
            keep = {k: saved[k] for k in ("video_only_temporal", "video_pos_std", "video_time_std") if k in saved}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the run says which heads it lacks (untrained)
                model = AllInOne.from_official(
                    ckpt["model"] if start.ours else ckpt, frames=opts.frames or None,
                    heads=saved.get("heads") or opts.attention_heads or None, temporal=opts.temporal or saved.get("temporal", "roll"),
                    fold_div=opts.fold_div or saved.get("fold_div", 8), dropout=opts.dropout,
                    checkpointing=opts.checkpointing, **keep, **task_head)
            untrained = set(ckpt.get("untrained", ())) | set(model.fresh_heads)
            if model.cfg.vocab_size != vocab_size:
                raise BadInput(f"--init {start.path} has a {model.cfg.vocab_size}-token vocabulary, the tokenizer "
                               f"({opts.vocab or 'its own'}) {vocab_size}")
        else:
            cfg = Config.preset(opts.preset, vocab_size=vocab_size, frames=opts.frames or PRESETS[opts.preset]["frames"],
                                image_size=opts.image_size or PRESETS[opts.preset]["image_size"],
                                temporal=opts.temporal or "roll", fold_div=opts.fold_div or 8, dropout=opts.dropout,
                                checkpointing=opts.checkpointing, video_only_temporal=True,  # README: rolling in the
                                **task_head)  # video-only pass too
            model = AllInOne(cfg)
            untrained = {name for name in HEADS if hasattr(model, name)}
    except ValueError as e:  # a config that cannot be (image size, frames, fold_div, heads, answers): name it
        raise BadInput(f"cannot build the model: {e}") from None
    cfg = model.cfg
    return model, untrained, dataclasses.replace(opts, temporal=cfg.temporal, fold_div=cfg.fold_div, frames=cfg.frames)


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(vocab_file, texts):
    """BERT's WordPiece from a vocab.txt, or else a word-level vocabulary of the texts, with BERT's special tokens."""
    if vocab_file:
        vocab = read_vocab(vocab_file)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    else:
        normalizer, split = normalizers.Lowercase(), pre_tokenizers.Whitespace()
        words = {w for c in texts for w, _ in split.pre_tokenize_str(normalizer.normalize_str(c))}
        vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizer, split
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(s, vocab[s]) for s in ("[CLS]", "[SEP]")])
    return tok


def read_vocab(path):
    """A BERT vocab.txt: one token per line, the line number its id; every line a different, non-blank token."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--vocab {path}: cannot read it ({e})") from None
    vocab = {}
    for n, word in enumerate(lines, 1):
        if not word.strip() or word in vocab:
            raise BadInput(f"--vocab {path} line {n}: " + (f"{word!r} again (first on line {vocab[word] + 1})"
                           if word.strip() else "blank (a vocab.txt has one token per line)"))
        vocab[word] = n - 1
    if missing := [s for s in SPECIALS if s not in vocab]:
        raise BadInput(f"--vocab {path} lacks the special tokens {missing}: is it a BERT vocab.txt?")
    return vocab


def make_optimizer(model, trained, opts, device):
    """AdamW over the backbone and the heads this task trains (the other heads are frozen, so DDP finds a gradient for
    every parameter it syncs). As the official code: no weight decay on biases and LayerNorm weights, the QA head at
    10x the learning rate (group["lr_mult"]). Returns (optimizer, the parameters it trains)."""
    groups = {}
    for name, p in model.named_parameters():
        head = name.split(".")[0]
        p.requires_grad_(head not in HEADS or head in trained)
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, 10.0 if head == "qa_head" else 1.0), []).append(p)
    optimizer = torch.optim.AdamW([dict(params=ps, weight_decay=opts.weight_decay if decay else 0.0, lr_mult=mult)
                                   for (decay, mult), ps in groups.items()],
                                  lr=opts.lr, betas=(0.9, 0.98), fused=device.type in ("cuda", "cpu"))
    return optimizer, [p for ps in groups.values() for p in ps]


def summary(opts, model, device, world, resumed_at, folder):
    """The line a run starts with: the model, the device, the batch."""
    cfg = model.cfg
    return (f"All-in-One, task {opts.task}, temporal {cfg.temporal}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
            f" parameters, {cfg.frames} frames of {cfg.image_size} px; {device}, {world} process(es), batch {opts.batch}"
            + (f"; resumed from {folder.ckpt} at step {resumed_at}" if resumed_at else ""))


# --- checkpoints and the run folder


@dataclass
class Checkpoint:
    """What ckpt.pt holds, saved as a plain dict of tensors and plain containers (allinone.load_checkpoint reads it)."""
    config: dict  # allinone.Config's fields
    options: dict  # every Options field: what --resume continues with
    tokenizer: str  # the tokenizer as JSON (tokenizers.Tokenizer.from_str)
    preprocess: str  # how frames were normalised: "ours" | "official"
    answers: list  # the QA answer vocabulary ([] without a QA head)
    untrained: list  # heads never trained: evaluation leaves out what they would score
    model: dict = None  # the model's state dict
    optimizer: dict = None  # AdamW's state dict
    scaler: dict = None  # the fp16 loss scaler's
    step: int = 0  # optimizer steps taken
    rng: list = None  # each process's torch (and CUDA) random state, in rank order


class RunFolder:
    """--out holds one run. A lock, held for the whole run, makes a second run on the folder fail at once (the
    operating system drops it when the process ends, however it ends). A folder that holds a run is refused unless
    --resume continues it, or --restart moves its files to OUT/previous-<time>/; --eval-only adds rows to
    metrics.jsonl and writes no checkpoint."""

    def __init__(self, opts, main=True):
        self.opts, self.main, self.path, self.lock = opts, main, Path(opts.out), None
        self.ckpt = self.path / "ckpt.pt"
        self.saved = 0  # the step of the last checkpoint written (or resumed from): what a failed write keeps

    def __enter__(self):
        if not self.main:
            return self
        make_folder(self.path)
        self.lock = open(self.path / "lock", "a+")
        try:
            lock_file(self.lock)
        except OSError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "another process"
            self.__exit__()
            raise BadInput(f"--out {self.path} is in use by another run ({holder}): one run per folder") from None
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"process {os.getpid()}\n")
        self.lock.flush()
        for tmp in self.path.glob("ckpt.pt.*.tmp"):  # a write cut short by a killed run
            tmp.unlink()
        held = [p for p in (self.ckpt, self.path / "metrics.jsonl") if p.exists()]
        if self.opts.eval_only and not self.opts.resume:  # evaluations of other checkpoints may share a folder
            held = [p for p in held if p.name == "ckpt.pt"]
        if held and not self.opts.resume:
            if not self.opts.restart:
                self.__exit__()
                raise BadInput(f"--out {self.path} holds a run ({', '.join(p.name for p in held)}): --resume continues "
                               f"it, --restart moves it to {self.path}/previous-<time>/ and starts over, or choose "
                               "another --out")
            aside = self.path / time.strftime("previous-%Y%m%d-%H%M%S")
            aside.mkdir()
            for p in held:
                shutil.move(p, aside / p.name)
            print(f"--restart: moved {', '.join(p.name for p in held)} to {aside}")
        return self

    def __exit__(self, *exc):
        if self.lock:
            self.lock.close()  # and with it the lock
            self.lock = None


def lock_file(f):
    """An exclusive lock on an open file, or OSError if another process holds it."""
    if os.name == "nt":
        import msvcrt
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def write_file(path, write):
    """Write a file whole or not at all: write(f) into a temporary file of this process beside path, then a rename, so
    that a crash, a kill or a full disk leaves the previous file as it was. A failed write is a BadInput that names the
    file and gives the OS's reason (torch.save reports a full disk as an "unexpected pos")."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror}") from None
    f = WhyNot(os.fdopen(fd, "wb"))
    try:
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of any new file, not mkstemp's private ones
        with f.file:
            write(f)
            f.file.flush()
            os.fsync(f.file.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        why = f.error or e
        raise BadInput(f"cannot write {path}: {getattr(why, 'strerror', None) or why}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


class WhyNot:
    """A file that remembers why a write failed, for writers that replace the OS's reason with their own."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # seek, tell, flush: the file's own
        return getattr(self.file, name)


def make_folder(path):
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot make the folder {path}: {e.strerror}") from None


def append_line(path, line):
    """A line added to a file, or nothing (what was written is cut back off) and a BadInput with the OS's reason."""
    data = (line + "\n").encode()
    with open(path, "ab", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        try:
            if f.write(data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            f.truncate(size)
            raise BadInput(f"cannot add to {path}: {e.strerror}; the numbers above are not in it") from None


def rng_state():  # this process's random state: the CPU's and its GPU's
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def set_rng_state(states, rank):
    """This process's random state as it was saved (a run resumed on more processes than it had: the others keep their
    new seeds; on fewer GPUs: each process its own GPU's state, whatever the count)."""
    states = states if isinstance(states, list) else [states]
    if rank < len(states):
        torch.set_rng_state(states[rank]["torch"])
        if isinstance(states[rank].get("cuda"), torch.Tensor) and torch.cuda.is_available():
            torch.cuda.set_rng_state(states[rank]["cuda"])


# --- devices, precision, clocks


def pick_device(name):
    """auto: the accelerator there is (CUDA, MPS, ...), else the CPU; under torchrun, this process's GPU."""
    if name == "auto":
        name = getattr(torch.accelerator.current_accelerator(), "type", "cpu")
    return torch.device(name, torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def keep_freed_memory():
    """On Linux, glibc's allocator hands big freed blocks back to the system and faults them in again at the next step
    (3% of the default run, benchmarks/README.md); keep them, as the jemalloc PyTorch's CPU tuning guide suggests."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (glibc's most) come from the heap ...
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: ... which keeps up to 1 GB of freed memory


def mixed_precision(device, precision="auto"):
    """(autocast, loss scaler) for --precision. auto: bf16 where the GPU has it natively (Ampere and later), fp16 with a
    loss scaler on older GPUs and on MPS, fp32 on the CPU. The scaler does nothing when disabled, so the loop has one
    path; similarity matrices and losses are computed in float32 whatever the precision."""
    if precision == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "fp32" if device.type == "cpu" else "bf16" if native_bf16 else "fp16"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), torch.amp.GradScaler(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not torch.amp.is_autocast_available(device.type) or (device.type == "cuda" and dtype == torch.bfloat16
                                                             and not torch.cuda.is_bf16_supported()):
        raise BadInput(f"--precision {precision}: this torch build cannot autocast to {dtype} on {device.type}")
    return torch.autocast(device.type, dtype=dtype), torch.amp.GradScaler(device.type, enabled=precision == "fp16")


class Clock:
    """Wall time, and training time: wall time less what was spent in paused() (evaluation, checkpoints)."""

    def __init__(self, device):
        self.device, self.start, self.paused_s = device, time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self):
        start = self.now()
        try:
            yield
        finally:
            self.paused_s += self.now() - start

    def now(self):  # after the device has done what it was given, so that a reading means what it says
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)
        return time.perf_counter()

    def wall(self):
        return time.perf_counter() - self.start

    def training(self):
        return self.now() - self.start - self.paused_s


class Progress:
    """A line every few seconds while something long runs: how far, how fast, how long still."""

    def __init__(self, what, total, loud, every=10.0):
        self.what, self.total, self.loud, self.every = what, total, loud, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def __call__(self, n):
        self.done, now = self.done + n, time.perf_counter()
        if self.loud and (now - self.last > self.every or (self.done == self.total and now - self.start > self.every)):
            rate = self.done / max(now - self.start, 1e-9)
            print(f"{self.what}: {self.done}/{self.total}, {rate:.1f}/s, {(self.total - self.done) / rate:.0f} s left",
                  flush=True)
            self.last = now


# --- FLOP counting


def count_flops(objective, batch, autocast):
    """FLOPs of one forward and backward on the batch, under the run's autocast, by torch's counter taught the CPU and
    MPS attention kernels it misses (torch 2.13); the gradients are thrown away and the random state is left as it
    was, so that the run goes on as if this had not happened."""
    device = next(objective.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), flop_counter() as counter:
        with autocast:
            loss = objective(batch)["loss"]
        loss.backward()
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def flop_counter():
    aten, mapping = torch.ops.aten, {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math_for_mps"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)
        if hasattr(aten, name + "_backward"):
            mapping[getattr(aten, name + "_backward")] = lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)
    return FlopCounterMode(display=False, custom_mapping=mapping)


# --- several processes: torchrun, DDP


def start_processes(opts):
    """(rank, world size): under torchrun, each process takes its own GPU (before the process group starts)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        device = opts.device if opts.device != "auto" else getattr(torch.accelerator.current_accelerator(), "type", "cpu")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        elif device != "cpu":  # gloo cannot reduce MPS tensors
            raise BadInput(f"--device {device}: torchrun runs on CUDA GPUs (nccl) or on the CPU (gloo, --device cpu)")
        # rank 0 evaluates alone while the others wait in the next collective: longer than the default 10-30 minutes
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size()


def distributed(objective, world, compile):
    """The training step: DDP under torchrun (every parameter that needs a gradient gets one: no search for unused
    ones), compiled with --compile."""
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=False)
    return torch.compile(objective) if compile else objective


if __name__ == "__main__":
    main()
