"""
All in One: Exploring Unified Video-Language Pre-training (Wang et al., CVPR 2023).
Paper: https://arxiv.org/abs/2203.07303   Official code: https://github.com/showlab/all-in-one

One transformer reads raw video patches and text tokens together. Each sampled frame forms its own
sequence [text | frame tokens]; before every block a share of each frame's tokens is exchanged with the
previous and next frame (temporal token rolling), so frames see each other at no extra parameters or
FLOPs. Outputs are averaged over frames.

This file: config and presets, temporal rolling, the model (embeddings, blocks, heads), the losses
(VTM, MLM, contrastive), the metrics, and loading of official checkpoints without running code from the file.

Shape letters, used everywhere:
  b batch   t frames   n video tokens per frame (video [CLS] included)   l text length   d width
  h heads   e head width   s sequence length   v vocabulary   k options (multiple choice)
Videos are (b, t, c, H, W) float tensors of normalised pixels: official checkpoints were trained on ImageNet's mean
and std; train_tiny.py's runs from scratch map pixels to [-1, 1].
"""

import math
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch.utils.checkpoint import checkpoint

# BERT uncased special tokens: what official checkpoints were trained with.
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103

# -----------------------------------------------------------------------------
# Config and presets


@dataclass(frozen=True)
class Config:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    frames: int = 3
    image_size: int = 224
    patch_size: int = 16
    max_text_len: int = 40
    vocab_size: int = 30522
    fold_div: int = 8  # 1/fold_div of each frame's tokens come from the previous frame, as many from the next
    temporal: str = "roll"  # roll (the paper) | none (frames independent) | flatten (one sequence for all frames)
    video_only_temporal: bool = False  # also apply `temporal` in the video-only pass (the official code does not)
    dropout: float = 0.1
    contrastive_dim: int = 512
    video_pos_std: float = 0.02  # init std of the video position embedding (official 0.02)
    video_time_std: float = 0.0  # init std of the video time (temporal) embedding (official: zeros)
    init_gain: float = 1.0  # Linear and conv weights at init: PyTorch's default times this (see AllInOne._init)
    num_answers: int = 0  # > 0 adds the open-ended QA classifier
    mc_head: bool = False  # adds the multiple-choice scorer (official rank_output)
    checkpointing: bool = False  # in training, keep only each block's input and recompute the rest in backward

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.temporal not in ("roll", "none", "flatten"):
            raise ValueError(f"temporal must be 'roll', 'none' or 'flatten', not {self.temporal!r}")
        if self.temporal == "roll":
            roll_fold(self.tokens_per_frame, self.fold_div)  # raises if this image size cannot be rolled

    @property
    def tokens_per_frame(self):  # n: patches + the video [CLS]
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    # the paper's sizes; parameters counted with the VTM/MLM heads and contrastive projections (the paper's counts,
    # 12M / 33M / 110M, leave those out: 11.4M / 33.6M / 109.9M here)
    "tiny": dict(dim=192, depth=12, heads=3),  # 17.6M, All-in-one-Ti, from DeiT-Ti
    "small": dict(dim=384, depth=12, heads=6),  # 45.9M, All-in-one-S, from DeiT-S
    "base": dict(dim=768, depth=12, heads=12),  # 134.7M, All-in-one-B, from ViT-B/16
    # trains in minutes on a laptop CPU (train_tiny.py): 32 px frames of 8 px patches, a small vocabulary, video
    # position embeddings as loud as the patches at this width, and weights of std 1/sqrt(fan_in), or the motion words
    # come late (benchmarks/README.md)
    "nano": dict(dim=64, depth=4, heads=4, frames=4, image_size=32, patch_size=8, max_text_len=16, vocab_size=64,
                 video_pos_std=0.3, video_time_std=0.3, init_gain=3**0.5),  # 0.3M
}

# -----------------------------------------------------------------------------
# Temporal token rolling (pure functions)


def roll_fold(n, fold_div):
    """How many tokens of an n-token frame move each way; refuses sizes where nothing (or everything) would move."""
    fold = n // fold_div
    if fold < 1 or 2 * fold >= n:
        raise ValueError(
            f"temporal rolling needs 1 <= {n} // fold_div < {n} / 2 tokens per frame, got fold_div={fold_div} "
            f"({n} tokens per frame): use a larger image, a smaller patch or another fold_div"
        )
    return fold


def temporal_roll(x, fold_div=8):
    """Exchange a share of each frame's tokens with the neighbouring frames. x: (b, t, n, d) video tokens.

    With fold = n // fold_div, for every frame i (indices wrap around, so frame 0's neighbour is frame t-1):

        slot:       0      1 .. fold        fold+1 .. n-fold-1     n-fold .. n-1
        out[:, i] = CLS_i  tokens of i-1    tokens of i (stay)     tokens of i+1

        frame 0: [C0 | p2 p2 | a0 a0 a0 | n1 n1]     (C = video [CLS], p = previous, a = own, n = next)
        frame 1: [C1 | p0 p0 | a1 a1 a1 | n2 n2]
        frame 2: [C2 | p1 p1 | a2 a2 a2 | n0 n0]

    A permutation: nothing is added or lost, so the block after it costs the same FLOPs. Unlike TSM's shift, which
    moves channels of every position and zero-fills the ends, this moves whole tokens and wraps around.
    """
    n = x.shape[2]
    fold = roll_fold(n, fold_div)
    cls, prev, own, nxt = x.split([1, fold, n - 1 - 2 * fold, fold], dim=2)
    return torch.cat([cls, prev.roll(1, dims=1), own, nxt.roll(-1, dims=1)], dim=2)


def token_origins(frames, n, fold_div, depth):
    """The frame each slot's token started in, at the input of each block: (depth, t, n). The roll runs before every
    block, so at block k (from 0) a "previous" slot of frame i holds the token of frame i - (k + 1), a "next" slot that
    of frame i + k + 1 (mod t); the video [CLS] and the middle slots never move."""
    fold = roll_fold(n, fold_div)
    k, i, slot = torch.arange(1, depth + 1)[:, None, None], torch.arange(frames)[None, :, None], torch.arange(n)
    return torch.where((slot >= 1) & (slot <= fold), (i - k) % frames, torch.where(slot >= n - fold, (i + k) % frames, i))


# -----------------------------------------------------------------------------
# Modules


class Attention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):  # x (b, s, d); mask (b, 1, 1, s), True = may be attended to
        q, k, v = rearrange(self.qkv(x), "b s (k h e) -> k b h s e", k=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale e ** -0.5
        return F.dropout(self.proj(rearrange(x, "b h s e -> b s (h e)")), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm ViT block, as in DeiT / ViT-B/16 (the models All-in-One starts from)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.dropout)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TextEmbedding(nn.Module):
    """BERT's embedding: word + position + token type 0, then LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_text_len, cfg.dim)
        self.segment = nn.Embedding(2, cfg.dim)  # BERT's token type (segment) embedding; only row 0 is used
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.dropout = cfg.dropout

    def forward(self, ids):  # (b, l) -> (b, l, d)
        x = self.word(ids) + self.pos.weight[: ids.shape[1]] + self.segment.weight[0]
        return F.dropout(self.norm(x), self.dropout, self.training)


class VideoEmbedding(nn.Module):
    """Each frame cut into patches (16x16 px in the paper) in raster order, plus spatial and temporal position
    embeddings; a video [CLS] goes first, with a spatial but no temporal embedding."""

    def __init__(self, cfg):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens_per_frame, cfg.dim))  # [CLS] then patches
        self.temporal = nn.Parameter(torch.zeros(1, cfg.frames, cfg.dim))
        self.dropout = cfg.dropout

    def forward(self, video):  # (b, t, c, H, W) -> (b, t, n, d)
        b, t = video.shape[:2]
        x = rearrange(self.patch(video.flatten(0, 1)), "(b t) d gh gw -> b t (gh gw) d", b=b)
        x = x + self.pos[:, None, 1:] + self.temporal[0, :t, None]  # each patch: where it is, and when
        cls = repeat(self.cls + self.pos[:, :1], "1 1 d -> b t 1 d", b=b, t=t)  # no temporal embedding on [CLS]
        return F.dropout(torch.cat([cls, x], dim=2), self.dropout, self.training)


class MLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, decoder (not tied to the word embeddings)."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-12)
        self.decoder = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):  # (b, l, d) -> (b, l, v)
        return self.decoder(self.norm(F.gelu(self.dense(x)))) + self.bias


class Output(NamedTuple):
    text: Optional[torch.Tensor]  # (b, l, d)   frame-averaged text tokens
    video: Optional[torch.Tensor]  # (b, n, d)   frame-averaged video tokens, [CLS] first
    pooled: torch.Tensor  # (b, d)      tanh(dense(first token)): the text [CLS], or the video [CLS] when video only


class AllInOne(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.text_embed = TextEmbedding(cfg)
        self.video_embed = VideoEmbedding(cfg)
        self.modality = nn.Embedding(2, d)  # 0 text, 1 video
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pooler = nn.Linear(d, d)
        self.vtm_head = nn.Linear(d, 2)  # video-text matching; row 1 = "match"
        self.mlm_head = MLMHead(cfg)
        self.text_proj = nn.Linear(d, cfg.contrastive_dim)  # contrastive projections of the unimodal [CLS]
        self.video_proj = nn.Linear(d, cfg.contrastive_dim)
        if cfg.num_answers:  # open-ended QA: a classifier over the answer vocabulary, on the pooled feature
            h = d // 2
            self.qa_head = nn.Sequential(nn.Dropout(0.5), nn.Linear(d, h), nn.LayerNorm(h), nn.GELU(), nn.Linear(h, cfg.num_answers))
        if cfg.mc_head:  # multiple choice: one score per (clip, option) pair
            self.mc_head = nn.Linear(d, 1)
        self.apply(lambda m: self._init(m, cfg.init_gain))
        nn.init.trunc_normal_(self.video_embed.cls, std=0.02)
        nn.init.trunc_normal_(self.video_embed.pos, std=cfg.video_pos_std)
        if cfg.video_time_std:
            nn.init.trunc_normal_(self.video_embed.temporal, std=cfg.video_time_std)
        if cfg.mc_head:
            self.init_mc_head()

    @staticmethod
    def _init(m, gain):
        # Linear and conv weights keep PyTorch's default, std 1/sqrt(3 fan_in), times gain: 0.021 at width 768 with
        # gain 1, the official N(0, 0.02), and wider at small widths, where a fixed 0.02 stalls training from scratch
        # (README)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data.mul_(gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # --- inputs

    def embed_text(self, ids, mask):  # (b, l) -> (b, l, d), key mask (b, 1, 1, l)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"text_ids and text_mask must both be (b, l), got {tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"text length {ids.shape[1]} is longer than the position table ({self.cfg.max_text_len})")
        x = self.text_embed(ids) + self.modality.weight[0]
        return x, rearrange(mask.bool(), "b l -> b 1 1 l")

    def embed_video(self, video):  # (b, t, c, H, W) -> (b, t, n, d)
        cfg = self.cfg
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (b, t, 3, H, W), got {tuple(video.shape)}")
        if video.shape[3] % cfg.patch_size or video.shape[4] % cfg.patch_size:
            raise ValueError(f"video frames {tuple(video.shape[3:])} are not a multiple of the {cfg.patch_size} px patch")
        if video.shape[3:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"video frames are {tuple(video.shape[3:])}, the model's position table is for {cfg.image_size} px")
        if video.shape[1] > cfg.frames:
            raise ValueError(f"{video.shape[1]} frames, but the temporal embedding has {cfg.frames}")
        return self.video_embed(video) + self.modality.weight[1]

    # --- the transformer over per-frame sequences

    def run_frames(self, x, mask, l, roll):
        """Blocks over (b, t, s, d) per-frame sequences whose first l tokens are text; the rest rolls between
        frames before every block when `roll`. Returns the final-normed tokens averaged over frames: (b, s, d)."""
        t = x.shape[1]
        x = rearrange(x, "b t s d -> (b t) s d")
        if mask is not None:
            mask = repeat(mask, "b 1 1 s -> (b t) 1 1 s", t=t)
        for block in self.blocks:
            if roll:  # temporal token rolling: exchange tokens with the neighbouring frames; the text stays where it is
                video = rearrange(x[:, l:], "(b t) n d -> b t n d", t=t)
                x = torch.cat([x[:, :l], rearrange(temporal_roll(video, self.cfg.fold_div), "b t n d -> (b t) n d")], 1)
            x = self.run_block(block, x, mask)
        return reduce(self.norm(x), "(b t) s d -> b s d", "mean", t=t)  # average the frames' views of each token

    def run_flat(self, text, video, mask):
        """Ablation `flatten`: the text once, then every frame's tokens, all in one sequence."""
        t, l = video.shape[1], 0 if text is None else text.shape[1]
        x = rearrange(video, "b t n d -> b (t n) d")
        if text is not None:
            x = torch.cat([text, x], 1)
            mask = F.pad(mask, (0, x.shape[1] - l), value=True)
        for block in self.blocks:
            x = self.run_block(block, x, mask)
        x = self.norm(x)
        return torch.cat([x[:, :l], reduce(x[:, l:], "b (t n) d -> b n d", "mean", t=t)], 1)

    def run_block(self, block, x, mask):
        """One block; with cfg.checkpointing and gradients on, activation checkpointing: the block's activations are
        recomputed in backward instead of kept (the same outputs and gradients, for less memory and more time)."""
        if self.cfg.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, mask, use_reentrant=False)
        return block(x, mask)

    def pool(self, x):  # first token -> (b, d)
        return torch.tanh(self.pooler(x[:, 0]))

    # --- the three passes

    def forward(self, video, text_ids, text_mask):
        """Joint pass. video (b, t, 3, H, W) in [-1, 1]; text_ids, text_mask (b, l). Returns Output(text, video, pooled)."""
        text, mask = self.embed_text(text_ids, text_mask)  # (b, l, d)
        video = self.embed_video(video)  # (b, t, n, d)
        if video.shape[0] != text.shape[0]:
            raise ValueError(f"batch sizes disagree: video has {video.shape[0]} clips, text has {text.shape[0]} rows")
        b, t, n, d = video.shape
        l = text.shape[1]
        if self.cfg.temporal == "flatten":
            x = self.run_flat(text, video, mask)
        else:  # one sequence [text | frame] per frame, padded text masked as keys only
            x = torch.cat([repeat(text, "b l d -> b t l d", t=t), video], dim=2)  # (b, t, l+n, d)
            x = self.run_frames(x, F.pad(mask, (0, n), value=True), l, roll=self.cfg.temporal == "roll")
        return Output(text=x[:, :l], video=x[:, l:], pooled=self.pool(x))

    def encode_text(self, text_ids, text_mask):
        """Text alone, once (the official code repeats it per frame; every copy is the same). -> Output(text, None, pooled)"""
        x, mask = self.embed_text(text_ids, text_mask)
        x = self.run_frames(x[:, None], mask, l=x.shape[1], roll=False)
        return Output(text=x, video=None, pooled=self.pool(x))

    def encode_video(self, video):
        """Video alone: frames run independently, as in the official code, unless cfg.video_only_temporal."""
        x = self.embed_video(video)
        temporal = self.cfg.temporal if self.cfg.video_only_temporal else "none"
        if temporal == "flatten":
            x = self.run_flat(None, x, None)
        else:
            x = self.run_frames(x, None, l=0, roll=temporal == "roll")
        return Output(text=None, video=x, pooled=self.pool(x))

    # --- downstream scores

    def match_score(self, pooled):  # (b, d) -> (b,): the VTM "match" logit, for zero-shot multiple choice and re-ranking
        return F.linear(pooled, self.vtm_head.weight[1:], self.vtm_head.bias[1:])[:, 0]

    def mc_score(self, pooled):  # (b, d) -> (b,): multiple-choice score: mc_head once fine-tuned, else the match logit
        return self.mc_head(pooled)[:, 0] if self.cfg.mc_head else self.match_score(pooled)

    def score_options(self, video, option_ids, option_mask):
        """Multiple choice: each clip with each of its k options in a joint pass, scored by mc_score, as the official
        compute_multiple_choice. video (b, t, 3, H, W), option_ids and option_mask (b, k, l) -> scores (b, k)"""
        k = option_ids.shape[1]
        out = self(repeat(video, "b ... -> (b k) ...", k=k), rearrange(option_ids, "b k l -> (b k) l"),
                   rearrange(option_mask, "b k l -> (b k) l"))
        return rearrange(self.mc_score(out.pooled), "(b k) -> b k", k=k)

    @torch.no_grad()
    def init_mc_head(self):
        """Start the multiple-choice scorer as a copy of the VTM "match" row (the official rank_output is one, read
        from the checkpoint in its zero-shot evaluation): fine-tuning then starts from the zero-shot scores."""
        self.mc_head.weight.copy_(self.vtm_head.weight[1:])
        self.mc_head.bias.copy_(self.vtm_head.bias[1:])

    # --- official checkpoints

    @classmethod
    def from_official(cls, ckpt, frames=None, heads=None, **overrides):
        """Build a model from an official checkpoint: a path to a Lightning .ckpt (weights under "state_dict") or a
        plain state dict file, both read with load_checkpoint (no code from the file runs), or a dict read from one.

        The config is read from the tensor shapes. The number of heads is not in the shapes: it comes from `heads`,
        else the checkpoint's hyper-parameters, else the width when it is an official size (192, 384, 768: heads of
        64). `frames` other than the checkpoint's crops or zero-pads the temporal embedding, as the official loader
        does. A multiple-choice checkpoint's rank_output becomes mc_head; `mc_head=True` on another starts it from
        the VTM match row. Returns the model in eval mode; `model.fresh_heads` names the heads the checkpoint lacked."""
        ckpt = ckpt if isinstance(ckpt, Mapping) else load_checkpoint(ckpt)
        raw = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", ckpt).items() if torch.is_tensor(v)}
        names = {_our_name(k): k for k in raw}  # ours -> the checkpoint's, to report keys as the file names them
        state = {ours: raw[k] for ours, k in names.items()}
        missing = [k for k in SHAPE_KEYS if k not in state]
        if missing:
            raise ValueError(f"checkpoint lacks backbone weights: {', '.join(missing)}")
        word, patch = state["text_embed.word.weight"], state["video_embed.patch.weight"]
        dim, ckpt_frames = word.shape[1], state["video_embed.temporal"].shape[1]
        answers = state["qa_head.4.weight"].shape[0] if "qa_head.4.weight" in state else 0
        if answers and overrides.get("num_answers", answers) != answers:
            raise ValueError(f"the checkpoint's QA head has {answers} answers, not {overrides['num_answers']}")
        cfg = Config(**{
            "dim": dim,
            "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
            "heads": heads or _official_heads(ckpt, dim),
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] // dim,
            "frames": frames or ckpt_frames,
            "image_size": math.isqrt(state["video_embed.pos"].shape[1] - 1) * patch.shape[-1],
            "patch_size": patch.shape[-1],
            "max_text_len": state["text_embed.pos.weight"].shape[0],
            "vocab_size": word.shape[0],
            "contrastive_dim": state["text_proj.weight"].shape[0] if "text_proj.weight" in state else Config.contrastive_dim,
            "num_answers": answers,
            "mc_head": "mc_head.weight" in state,
            **overrides,
        })
        if cfg.frames != ckpt_frames:  # crop, or pad with zeros, the temporal embedding
            temporal = state["video_embed.temporal"][:, : cfg.frames]
            state["video_embed.temporal"] = F.pad(temporal, (0, 0, 0, cfg.frames - temporal.shape[1]))
            warnings.warn(f"checkpoint has {ckpt_frames} frames, model has {cfg.frames}: temporal embedding "
                          f"{'cropped' if cfg.frames < ckpt_frames else 'zero-padded'}")
        model = cls(cfg)
        expected = model.state_dict()
        missing = [k for k in expected if k not in state and k.split(".")[0] not in HEADS]
        if missing:
            raise ValueError(f"checkpoint lacks backbone weights: {', '.join(missing)}")
        extra = [names[k] for k in state if k not in expected]
        if extra:
            warnings.warn(f"ignored checkpoint entries (not part of this model): {', '.join(extra)}")
        from_match_row = cfg.mc_head and "mc_head.weight" not in state
        fresh = [k for k in expected if k not in state and not (from_match_row and k.startswith("mc_head."))]
        if from_match_row and "vtm_head.weight" not in state:
            fresh += ["mc_head.weight", "mc_head.bias"]  # a copy of a fresh row
        if fresh:
            warnings.warn(f"heads not in the checkpoint, left freshly initialised: {', '.join(fresh)}")
        model.load_state_dict({**expected, **{k: v for k, v in state.items() if k in expected}})
        if from_match_row:
            model.init_mc_head()  # the loaded match row: fine-tuning starts from the zero-shot scores
        model.fresh_heads = tuple(sorted({k.split(".")[0] for k in fresh}))
        return model.eval()


# -----------------------------------------------------------------------------
# Losses (pure functions of tensors)


def mlm_mask(ids, mask, vocab_size, prob=0.15, mask_id=MASK_ID, special_ids=(PAD_ID, CLS_ID, SEP_ID), continues=None,
             generator=None):
    """BERT masking. Picks `prob` of the real (mask == 1), non-special tokens; of those 80% become [MASK], 10% a random
    token, 10% stay. With `continues` (b, l), True where a token continues the word before it (WordPiece's "##"
    pieces), whole words are picked: `prob` of the words, each with all its pieces. Returns (masked ids, labels), labels
    -100 everywhere but the picked positions."""
    draw = generator.device if generator is not None else ids.device  # a generator draws on its own device

    def rand(p):
        return torch.rand(ids.shape, generator=generator, device=draw).to(ids.device) < p

    lots = torch.rand(ids.shape, generator=generator, device=draw).to(ids.device)
    if continues is not None:  # every piece takes the lot drawn at its word's first piece
        position = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        lots = lots.gather(1, torch.where(continues, 0, position).cummax(1).values)
    can = mask.bool() & ~torch.isin(ids, torch.tensor(special_ids, device=ids.device))
    picked = can & (lots < prob)
    to_mask = picked & rand(0.8)
    to_random = picked & ~to_mask & rand(0.5)  # half of the remaining 20%
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device=draw).to(ids.device)
    out = torch.where(to_mask, torch.full_like(ids, mask_id), torch.where(to_random, random_ids, ids))
    return out, torch.where(picked, ids, torch.full_like(ids, -100))


def mlm_loss(logits, labels):  # (b, l, v), (b, l) with -100 = not predicted; 0 when nothing is (a short batch)
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def vtm_batch(video, generator=None):
    """Half of the pairs keep their clip (label 1); the other half get another clip of the batch (label 0).
    video (b, ...) -> (video for each caption, labels (b,))"""
    b = video.shape[0]
    if b < 2:
        raise ValueError("VTM needs a batch of at least 2 clips to build mismatched pairs")
    draw = generator.device if generator is not None else "cpu"  # a generator draws on its own device
    labels = (torch.randperm(b, generator=generator, device=draw) < b // 2).long()  # a random half matched
    other = (torch.arange(b, device=draw) + torch.randint(1, b, (b,), generator=generator, device=draw)) % b  # not its own
    idx = torch.where(labels.bool(), torch.arange(b, device=draw), other)
    return video[idx.to(video.device)], labels.to(video.device)


def vtm_loss(logits, labels):  # (b, 2), (b,)
    return F.cross_entropy(logits, labels)


def cosine_similarity(a, b):  # (m, k), (n, k) -> (m, n), in float32 even under autocast (bf16 has 3 significant digits)
    with torch.autocast(a.device.type, enabled=False):
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def contrastive_loss(text_emb, video_emb, temperature=0.05, labels=None):
    """Symmetric InfoNCE over cosine similarities: row i of text and of video are a pair. (b, k), (b, k) -> scalar.
    With labels (b,), rows of one label are all pairs (several clips of one caption): each row's loss is -log the
    summed probability of its pairs, so no pair is pushed apart as a negative."""
    logits = cosine_similarity(text_emb, video_emb) / temperature  # (b, b)
    if labels is None:
        target = torch.arange(len(logits), device=logits.device)
        return F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    pairs = labels[:, None] == labels[None, :]  # symmetric, so it serves both directions
    return sum((x.logsumexp(1) - x.masked_fill(~pairs, -math.inf).logsumexp(1)).mean() for x in (logits, logits.T))


# -----------------------------------------------------------------------------
# Metrics (pure functions): every accuracy and rank counts ties against the model, so a model that scores everything
# the same is never right, and a NaN score is wrong


def strictly_best(scores, index):
    """(n, k) scores, (n,) indices -> (n,) True where the index's score is above every other score of its row."""
    own = scores.gather(1, index[:, None])[:, 0]
    others = scores.scatter(1, index[:, None], -math.inf).max(1).values
    return own > others


def first_hit_ranks(sim, hits):
    """(q, i) similarities and (q, i) bool hits -> (q,) rank of each query's best hit (1 = first). Every other item
    that scores as high as the best hit ranks before it; a NaN scores lowest."""
    sim = sim.float().nan_to_num(nan=-math.inf)
    best = sim.masked_fill(~hits, -math.inf).amax(1, keepdim=True)
    return 1 + ((sim >= best) & ~hits).sum(1)


def recall_metrics(ranks, direction):
    """The MSR-VTT protocol from (q,) ranks: recall at 1, 5 and 10 and the median rank, e.g. t2v_r1 ... t2v_medr."""
    out = {f"{direction}_r{k}": (ranks <= k).float().mean().item() for k in (1, 5, 10)}
    out[f"{direction}_medr"] = torch.quantile(ranks.float(), 0.5).item()  # the mean of the middle two when even
    return out


# -----------------------------------------------------------------------------
# Official checkpoints: their key names, and reading a file without running code from it

OFFICIAL_NAMES = {  # official prefix -> ours
    "text_embeddings.word_embeddings": "text_embed.word",
    "text_embeddings.position_embeddings": "text_embed.pos",
    "text_embeddings.token_type_embeddings": "text_embed.segment",
    "text_embeddings.LayerNorm": "text_embed.norm",
    "token_type_embeddings": "modality",
    "transformer.patch_embed.proj": "video_embed.patch",
    "transformer.cls_token": "video_embed.cls",
    "transformer.pos_embed": "video_embed.pos",
    "transformer.temporal_embed": "video_embed.temporal",
    "transformer.blocks": "blocks",
    "transformer.norm": "norm",
    "pooler.dense": "pooler",
    "itm_score.fc": "vtm_head",
    "mlm_score.transform.dense": "mlm_head.dense",
    "mlm_score.transform.LayerNorm": "mlm_head.norm",
    "mlm_score.decoder": "mlm_head.decoder",
    "mlm_score.bias": "mlm_head.bias",
    "txt_proj": "text_proj",
    "vid_proj": "video_proj",
    "vqa_classifier": "qa_head",
    "rank_output": "mc_head",
}
SHAPE_KEYS = [  # what the config is read from
    "text_embed.word.weight", "text_embed.pos.weight", "video_embed.patch.weight", "video_embed.pos",
    "video_embed.temporal", "blocks.0.mlp.fc1.weight",
]
HEADS = ("vtm_head", "mlm_head", "text_proj", "video_proj", "qa_head", "mc_head")  # may be absent: left fresh
OFFICIAL_HEADS = {192: 3, 384: 6, 768: 12}  # width -> heads of the official sizes (heads of 64)


def _our_name(key):
    for old, new in OFFICIAL_NAMES.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key  # not an official name: reported as extra unless it is already ours


def _official_heads(ckpt, dim):
    hparams = ckpt.get("hyper_parameters")  # the official LightningModule saves its config there
    config = hparams.get("config") if isinstance(hparams, Mapping) else None
    if isinstance(config, Mapping) and isinstance(config.get("num_heads"), int):
        return config["num_heads"]
    if dim in OFFICIAL_HEADS:
        return OFFICIAL_HEADS[dim]
    raise ValueError(f"the number of attention heads of a width-{dim} model cannot be read from its weights: "
                     f"pass heads= (train_tiny.py: --attention-heads)")


class Unloaded:
    """Stands in for a class or function a checkpoint refers to: built from nothing, calls nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<{type(self).__module__}.{type(self).__qualname__}: not loaded>"


def load_checkpoint(path):
    """A torch.save file (a Lightning .ckpt, a state dict, a train_tiny.py checkpoint) read without running any code
    from it: torch's weights_only loader, which builds tensors and plain containers only. Any other class or function
    the file names is replaced by an inert stand-in (an `Unloaded`: building one does nothing), so none of them runs,
    and Lightning 1.1 checkpoints, which key their callbacks' states by the callbacks' classes, load without
    Lightning; names from the modules os, sys, posix and nt are refused outright. Raises ValueError naming the file
    and the reason."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
        stand_ins = [(type(name.rpartition(".")[2], (Unloaded,), {"__module__": name.rpartition(".")[0]}), name)
                     for name in unknown]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ValueError(f"cannot load {path}: {e.strerror}") from None
    except Exception as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]  # torch's reason, not its advice
        if isinstance(e, pickle.UnpicklingError) and refused:
            raise ValueError(f"cannot load {path} safely: {refused[0]}") from None
        reason = "" if isinstance(e, pickle.UnpicklingError) else f" ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise ValueError(f"cannot load {path}: not a file written by torch.save{reason}") from None
