"""Tests for allinone.py, train_tiny.py and examples/, in the order of the code. Quick, CPU only: python -m pytest -q test_allinone.py"""

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from einops import rearrange

import train_tiny as tt
from allinone import (
    CLS_ID, MASK_ID, PAD_ID, SEP_ID, AllInOne, Config, Output, Unloaded, contrastive_loss, cosine_similarity,
    first_hit_ranks, load_checkpoint, mlm_loss, mlm_mask, recall_metrics, strictly_best, temporal_roll, token_origins,
    vtm_batch, vtm_loss,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "examples"))
import train_videos as tv  # noqa: E402  the companion: real videos, data files, --samples
FIXTURE = HERE / "testdata" / "official_mini.pt"
QUICK = ["--batch", "8", "--vtm-clips", "4", "--mlm-clips", "2", "--eval-clips", "16", "--log-every", "1",
         "--warmup", "2", "--device", "cpu"]  # a train_tiny.py run that takes a second a step
PORTRAIT = [0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30]  # a phone filmed upright: the display matrix turns it 90°


# --- helpers shared by the tests ------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Float sums in one fixed order: what exactness tests on the CPU need (two threads vary with the load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def loaded(official):
    return AllInOne.from_official(official["state_dict"], heads=official["config"]["heads"])


def small_model(**kw):
    torch.manual_seed(0)
    cfg = Config(**{**dict(dim=32, depth=2, heads=2, frames=3, image_size=32, patch_size=8, max_text_len=8, vocab_size=50,
                           contrastive_dim=16, dropout=0.0), **kw})
    return AllInOne(cfg)


def small_batch(b=2, t=3, size=32, l=8, vocab=50):
    g = torch.Generator().manual_seed(1)
    video = torch.rand(b, t, 3, size, size, generator=g) * 2 - 1
    ids = torch.randint(4, vocab, (b, l), generator=g)
    mask = torch.ones(b, l, dtype=torch.long)
    mask[1, l // 2:] = 0
    return video, ids, mask


def assert_close(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5, f"{name}: max abs difference {err:.2e}"


def run_cli(argv, capsys, main=tt.main):
    """train_tiny's command line (or the companion's, main=tv.main) in this process: (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def script(main, argv):
    """An example script's command line: bad input is one line and exit status 1."""
    with tt.one_line_errors():
        return main(argv)


def train_videos(argv):
    """examples/train_videos.py's training run in this process: its last metrics."""
    return tt.train(tt.parse_options(argv, tv.VideoOptions), tv.Clips)


def ckpt_of(folder):
    return load_checkpoint(Path(folder) / "ckpt.pt")


def model_of(folder):
    """The model of a run's ckpt.pt, in eval mode, and its tokenizer."""
    ckpt = ckpt_of(folder)
    model = AllInOne(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), tt.Tokens(tt.Tokenizer.from_str(ckpt["tokenizer"]), model.cfg.max_text_len)


def write(path, content):
    path.write_text(content)
    return path


class Payload:  # a pickle that runs code when a naive loader reads it
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def craft(path, marker, via="exec"):
    """A checkpoint-looking file whose unpickling would create `marker`."""
    import builtins
    import os
    fn, arg = (builtins.exec, f"open({str(marker)!r}, 'w')") if via == "exec" else (os.system, f"touch {marker}")
    torch.save({"model": Payload(fn, arg), "state_dict": {"w": torch.ones(1)}}, path)
    return path


def lightning_checkpoint(path, monkeypatch, **extra):
    """An official-format file: Lightning 1.1 keys its callbacks' states by their classes, so its pickle names
    pytorch_lightning; saved with stand-in modules that are gone again when it is read."""
    import types
    with monkeypatch.context() as m:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
            m.setitem(sys.modules, name, types.ModuleType(name))
        cls = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
        sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = cls
        torch.save(dict(epoch=9, global_step=100, callbacks={cls: dict(best_model_score=torch.tensor(0.5))}, **extra), path)
    assert "pytorch_lightning" not in sys.modules
    return path


def official_files(folder, monkeypatch, official, texts):
    """The parity fixture's weights as an official Lightning checkpoint, and a BERT-style vocab.txt (128 tokens, the
    fixture's vocabulary size) holding the words of the texts: what a user of the released checkpoints has."""
    lightning_checkpoint(folder / "all-in-one-base.ckpt", monkeypatch, state_dict=official["state_dict"],
                         hyper_parameters=dict(config=dict(num_heads=2)))
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += sorted({w for t in texts for w in t.lower().split()} - set(words))
    write(folder / "vocab.txt", "\n".join(words + [f"[pad{i}]" for i in range(128 - len(words))]) + "\n")
    return folder / "all-in-one-base.ckpt", folder / "vocab.txt"


def example(name):
    """A script of examples/, imported as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, HERE / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Each test video shows its frame index as a 4x4 grid of black/white cells (bit j = cell j), so a test can read
# which frame load_clip returned.


def draw_index(i, w, h):
    img = np.full((h, w, 3), 128, np.uint8)
    m = min(w, h)
    c, y0, x0 = m // 4, (h - m) // 2, (w - m) // 2
    for j in range(16):
        r, q = divmod(j, 4)
        img[y0 + r * c: y0 + (r + 1) * c, x0 + q * c: x0 + (q + 1) * c] = 255 * ((i >> j) & 1)
    return img


def read_index(frame):  # (3, s, s) in [-1, 1] -> the frame index drawn in it
    g = frame.mean(0).numpy()
    c = g.shape[0] / 4
    bits = [g[int((r + 0.3) * c): int((r + 0.7) * c), int((q + 0.3) * c): int((q + 0.7) * c)].mean() > 0
            for r in range(4) for q in range(4)]
    return sum(b << j for j, b in enumerate(bits))


def indices(clip):
    return [read_index(f) for f in clip]


def make_video(path, n=60, w=64, h=48, codec="libx264", times=None, matrix=None, gop=10, options=None, draw=draw_index,
               pix_fmt="yuv420p", codec_options=None):
    """n frames at 30 fps, or at `times` (seconds: a variable frame rate)."""
    with av.open(str(path), "w", options=options or {}) as out:
        s = out.add_stream(codec, rate=30, options=codec_options or {})
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.codec_context.gop_size = gop
        if times is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if matrix is not None:
            s.set_display_matrix(matrix)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(draw(i, w, h), format="rgb24")
            if times is not None:
                f.pts, f.time_base = round(times[i] * 1000), Fraction(1, 1000)
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


def middles(n, t):  # the segment middles, written out independently of train_tiny.segment_frames
    return [(k * n // t + max(k * n // t, (k + 1) * n // t - 1)) // 2 for k in range(t)]


def make_bad_files(folder):
    good = make_video(folder / "good.mp4", n=30).read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    fast = make_video(folder / "fast.mp4", n=30, options={"movflags": "faststart"}).read_bytes()
    (folder / "cut_faststart.mp4").write_bytes(fast[: len(fast) // 2])  # header intact, frames cut off
    with av.open(str(folder / "audio_only.m4a"), "w") as out:
        s = out.add_stream("aac", rate=16000)
        for i in range(10):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            out.mux(s.encode(f))
        out.mux(s.encode())
    return ["missing.mp4", "empty.mp4", "truncated.mp4", "corrupt.mp4", "cut_faststart.mp4", "audio_only.m4a"]


def make_clips(folder, n, frames=12):
    return [make_video(folder / f"clip{i}.mp4", n=frames, w=40, h=32, codec="mpeg4", draw=lambda j, w, h, i=i: draw_index(
        (i * 977 + j * 131) % 65536, w, h)).name for i in range(n)]


# =====================================================================================================================
# allinone.py


# --- parity with the official model; official checkpoints, loaded safely ---------------------------------------------


def test_parity_joint(official, loaded):
    i, e = official["inputs"], official["expected"]["joint"]
    with torch.no_grad():
        out = loaded(i["video"], i["text_ids"], i["text_masks"])
        assert_close(out.text, e["text_feats"], "text_feats")
        assert_close(out.video, e["image_feats"], "image_feats")
        assert_close(out.pooled, e["cls_feats"], "cls_feats")
        assert_close(loaded.vtm_head(out.pooled), e["itm_logits"], "itm_logits")
        assert_close(loaded.mlm_head(out.text), e["mlm_logits"], "mlm_logits")


def test_parity_text_only(official, loaded):
    i, e = official["inputs"], official["expected"]["text_only"]
    with torch.no_grad():
        out = loaded.encode_text(i["text_ids"], i["text_masks"])
        assert_close(out.text, e["text_feats"], "text_feats")
        assert_close(out.pooled, e["cls_feats"], "cls_feats")
        assert_close(loaded.text_proj(out.text), e["text_feats_proj"], "text_feats_proj")


def test_parity_video_only(official, loaded):
    i, e = official["inputs"], official["expected"]["video_only"]
    with torch.no_grad():
        out = loaded.encode_video(i["video"])
        assert_close(out.video, e["image_feats"], "image_feats")
        assert_close(out.pooled, e["cls_feats"], "cls_feats")
        assert_close(loaded.video_proj(out.video), e["image_feats_proj"], "image_feats_proj")


def test_text_only_pass_runs_the_text_once_and_equals_the_repeated_official_way(official, loaded):
    # the official code repeats the text per frame and averages: identical copies, so one pass is the same
    i = official["inputs"]
    with torch.no_grad():
        once = loaded.encode_text(i["text_ids"], i["text_masks"]).text
        x, mask = loaded.embed_text(i["text_ids"], i["text_masks"])
        repeated = loaded.run_frames(x[:, None].expand(-1, 4, -1, -1), mask, l=x.shape[1], roll=False)
    assert torch.allclose(once, repeated, atol=1e-6)


def test_from_official_reads_config_from_shapes(official, loaded):
    c = official["config"]
    got = loaded.cfg
    for key in ("dim", "depth", "heads", "frames", "image_size", "patch_size", "vocab_size", "max_text_len",
                "contrastive_dim", "fold_div"):
        assert getattr(got, key) == c[key], key
    assert not loaded.training


def test_from_official_lightning_file_extra_keys_and_frames(official, tmp_path):
    state = dict(official["state_dict"])
    state["text_embeddings.position_ids"] = torch.arange(16)[None]
    state["vqa_classifier.0.weight"] = torch.zeros(3, 64)  # a head of a layout this model does not have
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    with pytest.warns(UserWarning) as record:
        model = AllInOne.from_official(str(path), frames=6, heads=2)
    messages = [str(r.message) for r in record]
    extra = [m for m in messages if "ignored checkpoint entries" in m]
    assert len(extra) == 1 and "position_ids" in extra[0] and "vqa_classifier.0.weight" in extra[0]
    assert any("zero-padded" in m for m in messages)
    temporal = model.video_embed.temporal
    assert temporal.shape == (1, 6, 64)
    assert torch.equal(temporal[:, :4], official["state_dict"]["transformer.temporal_embed"])
    assert temporal[:, 4:].abs().sum() == 0
    with pytest.warns(UserWarning, match="cropped"):
        assert AllInOne.from_official(state, frames=2, heads=2).video_embed.temporal.shape == (1, 2, 64)


def test_from_official_missing_backbone_keys(official):
    state = {k: v for k, v in official["state_dict"].items() if k != "transformer.blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.weight"):
        AllInOne.from_official(state, heads=2)
    state = {k: v for k, v in official["state_dict"].items() if not k.startswith("transformer.pos_embed")}
    with pytest.raises(ValueError, match="video_embed.pos"):
        AllInOne.from_official(state, heads=2)


def test_from_official_missing_heads_are_listed(official):
    state = {k: v for k, v in official["state_dict"].items() if not k.startswith(("txt_proj", "vid_proj"))}
    with pytest.warns(UserWarning, match="text_proj.weight.*video_proj.bias"):
        AllInOne.from_official(state, heads=2)


def test_from_official_heads_from_hyper_parameters_widths_or_an_error(official):
    state = official["state_dict"]  # width 64, 2 heads: nothing in the shapes says 2
    with pytest.raises(ValueError, match="heads= .train_tiny.py: --attention-heads"):
        AllInOne.from_official(state)
    assert AllInOne.from_official({"state_dict": state, "hyper_parameters": {"config": {"num_heads": 2}}}).cfg.heads == 2
    wide = {k: v for k, v in AllInOne(Config.preset("tiny", depth=1)).state_dict().items()}
    assert AllInOne.from_official(wide).cfg.heads == 3  # All-in-one-Ti's width


def test_official_rank_output_loads_into_mc_head(official):
    state = dict(official["state_dict"])
    state["rank_output.weight"], state["rank_output.bias"] = torch.randn(1, 64), torch.tensor([0.5])
    model = AllInOne.from_official(state, heads=2)
    assert model.cfg.mc_head and torch.equal(model.mc_head.weight, state["rank_output.weight"])
    pooled = torch.randn(4, 64)
    assert torch.allclose(model.mc_score(pooled), pooled @ state["rank_output.weight"][0] + 0.5, atol=1e-6)
    # asked for on a checkpoint without one: the checkpoint's own match row
    plain = AllInOne.from_official(official["state_dict"], heads=2, mc_head=True)
    assert torch.equal(plain.mc_head.weight, official["state_dict"]["itm_score.fc.weight"][1:])
    assert "mc_head" not in plain.fresh_heads


def test_own_state_dict_round_trip():
    model = small_model()
    copy = AllInOne(model.cfg)
    copy.load_state_dict(model.state_dict())
    video, ids, mask = small_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(video, ids, mask).pooled, copy.eval()(video, ids, mask).pooled)


def test_load_checkpoint_runs_no_code_and_reads_lightning_files_without_lightning(tmp_path, official, monkeypatch):
    marker = tmp_path / "marker"
    loaded = load_checkpoint(craft(tmp_path / "exec.pt", marker))
    assert isinstance(loaded["model"], Unloaded) and not marker.exists()  # a stand-in, never called
    with pytest.raises(ValueError, match="system.pt safely: .*posix.system"):
        load_checkpoint(craft(tmp_path / "system.pt", marker, via="system"))
    assert not marker.exists()
    path = lightning_checkpoint(tmp_path / "official.ckpt", monkeypatch, state_dict=official["state_dict"],
                                hyper_parameters=dict(config=dict(num_heads=2, hidden_size=64)))
    model = AllInOne.from_official(path)  # heads from the hyper-parameters
    assert model.cfg.heads == 2 and torch.equal(model.pooler.weight, official["state_dict"]["pooler.dense.weight"])
    for bad, message in [(tmp_path, "Is a directory"), (tmp_path / "none.pt", "No such file"),
                         (HERE / "README.md", "not a file written by torch.save")]:
        with pytest.raises(ValueError, match=message):
            load_checkpoint(bad)


# --- temporal rolling ------------------------------------------------------------------------------------------------


def test_roll_hand_made_example():
    # 3 frames of 9 tokens, fold_div 4 -> fold 2: slots 1, 2 come from the previous frame, slots 7, 8 from the next
    t, n = 3, 9
    x = torch.arange(t * n).float().reshape(1, t, n, 1)  # token value = 9 * frame + slot
    out = temporal_roll(x, fold_div=4)[0, :, :, 0]
    expected = torch.tensor([
        [0, 19, 20, 3, 4, 5, 6, 16, 17],  # frame 0: slots 1-2 from frame 2 (wraps), slots 7-8 from frame 1
        [9, 1, 2, 12, 13, 14, 15, 25, 26],  # frame 1: from frames 0 and 2
        [18, 10, 11, 21, 22, 23, 24, 7, 8],  # frame 2: from frames 1 and 0 (wraps)
    ]).float()
    assert torch.equal(out, expected)


def test_roll_is_a_permutation_that_keeps_cls():
    x = torch.randn(2, 4, 17, 5)
    out = temporal_roll(x, fold_div=8)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert torch.equal(out.flatten(1, 2).sort(dim=1).values, x.flatten(1, 2).sort(dim=1).values)
    assert not torch.equal(out, x)
    assert torch.equal(temporal_roll(x[:, :1]), x[:, :1])  # one frame: nothing to exchange


def test_token_origins_follow_temporal_roll_block_after_block():
    for t, n, fold_div, depth in [(4, 17, 8, 4), (3, 197, 8, 12), (5, 10, 4, 3)]:
        ids = torch.arange(t, dtype=torch.float)[None, :, None, None].expand(1, t, n, 1)  # each token: its frame
        origins = token_origins(t, n, fold_div, depth)
        assert origins.shape == (depth, t, n)
        for k in range(depth):
            ids = temporal_roll(ids, fold_div)  # the roll before block k
            assert torch.equal(ids[0, :, :, 0].long(), origins[k]), (t, n, k)
    # nano: 2 of 16 patch slots each way; with 4 frames, a "previous" token is back home in the 4th block
    origins = token_origins(4, 17, 8, 4)
    assert (origins[:, :, 3:15] == torch.arange(4)[:, None]).all() and (origins[3, :, 1:3] == torch.arange(4)[:, None]).all()
    assert origins[0, 0, 1] == 3 and origins[0, 0, 16] == 1 and origins[1, 0, 1] == 2


def test_roll_refuses_sizes_that_would_move_nothing():
    with pytest.raises(ValueError, match="temporal rolling"):
        temporal_roll(torch.randn(1, 3, 5, 4), fold_div=8)  # 32 px frames of 16 px patches: 5 tokens
    with pytest.raises(ValueError, match="temporal rolling"):
        Config(image_size=32, patch_size=16)
    Config(image_size=32, patch_size=16, temporal="none")  # nothing rolls: fine


def test_joint_pass_rolls_video_before_every_block_and_never_the_text():
    model = small_model(depth=2).eval()
    seen = []

    class Record(torch.nn.Module):  # a block that keeps its input and changes nothing
        def forward(self, x, mask=None):
            seen.append(x.clone())
            return x

    model.blocks = torch.nn.ModuleList([Record(), Record()])
    b, t, l, n, d = 2, 3, 5, 17, 32
    x = torch.randn(b, t, l + n, d)
    model.run_frames(x, None, l=l, roll=True)
    first, second = (rearrange(s, "(b t) s d -> b t s d", t=t) for s in seen)
    assert torch.equal(first[:, :, :l], x[:, :, :l]) and torch.equal(second[:, :, :l], x[:, :, :l])  # text stays
    assert torch.equal(first[:, :, l:], temporal_roll(x[:, :, l:]))  # rolled before block 0 ...
    assert torch.equal(second[:, :, l:], temporal_roll(temporal_roll(x[:, :, l:])))  # ... and again before block 1


def test_roll_differs_from_none_only_through_rolled_slots():
    # One block, so tokens roll once, straight from the embedding. 32 px frames of 8 px patches: 17 tokens, fold 2;
    # patches 0, 1 (slots 1, 2) and 14, 15 (slots 15, 16) roll, patches 2..13 stay.
    model = small_model(depth=1).eval()
    with torch.no_grad():
        model.video_embed.temporal.zero_()  # frames then differ only by their pixels
    video, ids, mask = small_batch()
    video[:] = video[:, :1]  # every frame the same ...
    video[:, :, :, 8:16, 8:16] = torch.randn(2, 3, 3, 8, 8)  # ... except patch 5, which stays in place

    def both(v):
        with torch.no_grad():
            rolled = model(v, ids, mask)
            model.cfg = replace(model.cfg, temporal="none")
            plain = model(v, ids, mask)
            model.cfg = replace(model.cfg, temporal="roll")
        return rolled, plain

    rolled, plain = both(video)
    for a, b in zip(rolled, plain):
        assert torch.allclose(a, b, atol=1e-6)
    video[:, :, :, 0:8, 0:8] = torch.randn(2, 3, 3, 8, 8)  # patch 0 differs between frames: now rolling shows
    rolled, plain = both(video)
    assert not torch.allclose(rolled.video, plain.video, atol=1e-4)


def test_flatten_is_one_sequence_of_the_text_and_every_frame():
    # by hand: [text | frame 0 tokens | frame 1 tokens | ...] through the blocks, final norm, text kept, frames averaged
    model = small_model(temporal="flatten").eval()
    video, ids, mask = small_batch()
    with torch.no_grad():
        out = model(video, ids, mask)
        text, key_mask = model.embed_text(ids, mask)
        frames = model.embed_video(video)  # (b, t, n, d)
        x = torch.cat([text] + [frames[:, i] for i in range(frames.shape[1])], dim=1)
        keys = torch.cat([mask.bool(), torch.ones(2, x.shape[1] - ids.shape[1], dtype=torch.bool)], 1)[:, None, None]
        for block in model.blocks:
            x = block(x, keys)
        x = model.norm(x)
        l, n = ids.shape[1], frames.shape[2]
        video_tokens = torch.stack([x[:, l + i * n: l + (i + 1) * n] for i in range(frames.shape[1])]).mean(0)
    assert torch.allclose(out.text, x[:, :l], atol=1e-6) and torch.allclose(out.video, video_tokens, atol=1e-6)
    assert torch.allclose(out.pooled, torch.tanh(model.pooler(x[:, 0])), atol=1e-6)
    # the video-only pass of flatten: the same without text, when asked for
    model.cfg = replace(model.cfg, video_only_temporal=True)
    with torch.no_grad():
        v = frames.flatten(1, 2)
        for block in model.blocks:
            v = block(v)
        v = model.norm(v).view(2, 3, n, -1).mean(1)
        assert torch.allclose(model.encode_video(video).video, v, atol=1e-6)


def test_video_only_temporal_changes_the_video_only_pass_only_through_rolled_slots():
    # as in the joint pass above: frames that differ only in a patch that stays put give the same output with and
    # without rolling in the video-only pass; a difference in a rolled patch shows
    model = small_model(depth=1).eval()
    with torch.no_grad():
        model.video_embed.temporal.zero_()
    video = small_batch()[0]
    video[:] = video[:, :1]
    video[:, :, :, 8:16, 8:16] = torch.randn(2, 3, 3, 8, 8)  # patch 5: not rolled

    def both(v):
        with torch.no_grad():
            model.cfg = replace(model.cfg, video_only_temporal=True)
            rolled = model.encode_video(v)
            model.cfg = replace(model.cfg, video_only_temporal=False)
            return rolled, model.encode_video(v)

    rolled, plain = both(video)
    assert torch.allclose(rolled.video, plain.video, atol=1e-6) and torch.allclose(rolled.pooled, plain.pooled, atol=1e-6)
    video[:, :, :, 0:8, 0:8] = torch.randn(2, 3, 3, 8, 8)  # patch 0: rolled
    rolled, plain = both(video)
    assert not torch.allclose(rolled.video, plain.video, atol=1e-4)


# --- the model: initialisation, inputs, heads ------------------------------------------------------------------------


def test_video_embeddings_start_as_official_except_in_nano():
    official = AllInOne(Config.preset("tiny")).video_embed  # position N(0, 0.02), time embedding zeros
    assert 0.015 < official.pos.std().item() < 0.025 and not official.temporal.any()
    nano = AllInOne(Config.preset("nano")).video_embed  # both N(0, 0.3): the deviation train_tiny.py needs (README)
    assert 0.25 < nano.pos.std().item() < 0.35 and 0.2 < nano.temporal.std().item() < 0.4


def test_init_gain_scales_linear_and_conv_weights_only():
    torch.manual_seed(0)
    plain = AllInOne(Config.preset("nano", init_gain=1.0)).state_dict()
    torch.manual_seed(0)
    scaled = AllInOne(Config.preset("nano")).state_dict()  # nano: weights of std 1/sqrt(fan_in), 3**0.5 the default
    for name in ("blocks.0.attn.qkv.weight", "video_embed.patch.weight", "vtm_head.weight"):
        assert torch.allclose(scaled[name], 3**0.5 * plain[name]), name
    for name in ("blocks.0.attn.qkv.bias", "text_embed.word.weight", "video_embed.pos", "blocks.0.norm1.weight"):
        assert torch.equal(scaled[name], plain[name]), name


def test_padded_text_ids_do_not_matter():
    model = small_model().eval()
    video, ids, mask = small_batch()
    other = ids.clone()
    other[mask == 0] = torch.randint(4, 50, (int((mask == 0).sum()),))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        assert torch.allclose(model(video, ids, mask).pooled, model(video, other, mask).pooled, atol=1e-6)
        assert torch.allclose(model.encode_text(ids, mask).pooled, model.encode_text(other, mask).pooled, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda v, i, m: (v[0], i, m), r"video must be \(b, t, 3, H, W\)"),
    (lambda v, i, m: (v[:, :, :1], i, m), r"video must be \(b, t, 3, H, W\), got \(2, 3, 1, 32, 32\)"),
    (lambda v, i, m: (v[..., :30, :30], i, m), "not a multiple of the 8 px patch"),
    (lambda v, i, m: (v[..., :24, :24], i, m), "position table is for 32 px"),
    (lambda v, i, m: (torch.cat([v, v], 1), i, m), "6 frames, but the temporal embedding has 3"),
    (lambda v, i, m: (v, torch.cat([i, i], 1), torch.cat([m, m], 1)), "text length 16 is longer than the position table"),
    (lambda v, i, m: (v, i[:1], m[:1]), "batch sizes disagree"),
    (lambda v, i, m: (v, i, m[:, :4]), "text_ids and text_mask"),
])
def test_bad_input_raises_value_error_naming_the_problem(change, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        model(*change(*small_batch()))


def test_fewer_frames_than_the_temporal_embedding_is_fine():
    model = small_model().eval()
    video, ids, mask = small_batch(t=2)
    assert model(video, ids, mask).video.shape == (2, 17, 32)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        Config(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="temporal must be"):
        Config(temporal="shift")
    with pytest.raises(ValueError, match="unknown preset"):
        Config.preset("huge")
    assert Config.preset("base", frames=8).frames == 8


def test_checkpointing_leaves_outputs_and_gradients_unchanged_and_keeps_less(one_thread):
    video, ids, mask = small_batch()
    results = []
    for checkpointing in (False, True):
        model = small_model(dropout=0.1, checkpointing=checkpointing).train()  # dropout: the recompute draws the same
        torch.manual_seed(3)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            out = model(video, ids, mask)
            loss = model.vtm_head(out.pooled).sum() + model.encode_video(video).video.sum()
        loss.backward()
        results.append((out, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, sum(saved)))
    (plain, plain_grads, plain_saved), (ckpt, ckpt_grads, ckpt_saved) = results
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert plain_grads.keys() == ckpt_grads.keys() and all(torch.equal(plain_grads[k], ckpt_grads[k]) for k in plain_grads)
    assert ckpt_saved < plain_saved / 3  # what backward keeps: block inputs only


def test_training_step_reaches_every_parameter():
    model = small_model(num_answers=7).train()
    video, ids, mask = small_batch()
    masked, labels = mlm_mask(ids, mask, vocab_size=50, mask_id=3, generator=torch.Generator().manual_seed(0))
    labels[0, 1] = ids[0, 1]  # at least one prediction whatever the draw
    paired, match = vtm_batch(video, generator=torch.Generator().manual_seed(0))
    out = model(paired, ids, mask)
    text, vid = model.encode_text(ids, mask), model.encode_video(video)
    loss = (vtm_loss(model.vtm_head(out.pooled), match) + mlm_loss(model.mlm_head(model(video, masked, mask).text), labels)
            + contrastive_loss(model.text_proj(text.text[:, 0]), model.video_proj(vid.video[:, 0]))
            + model.qa_head(out.pooled).logsumexp(-1).mean())
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_match_score_is_the_vtm_match_logit():
    model = small_model().eval()
    pooled = torch.randn(3, 32)
    assert torch.allclose(model.match_score(pooled), model.vtm_head(pooled)[:, 1])


def test_mc_head_starts_as_the_match_row_and_scores_with_it():
    model = small_model(mc_head=True).eval()
    pooled = torch.randn(3, 32)
    assert torch.allclose(model.mc_score(pooled), model.match_score(pooled))  # fine-tuning starts from zero-shot
    with torch.no_grad():
        model.vtm_head.weight.add_(1.0)  # the scorer is a copy, not a view: it trains on its own
    assert not torch.allclose(model.mc_score(pooled), model.match_score(pooled))
    assert torch.allclose(small_model().mc_score(pooled), small_model().match_score(pooled))  # without mc_head


# --- losses and metrics ----------------------------------------------------------------------------------------------


def test_mlm_mask_rates_and_never_masked_tokens():
    g = torch.Generator().manual_seed(0)
    b, l = 400, 40
    ids = torch.randint(1000, 30000, (b, l), generator=g)
    ids[:, 0], ids[:, 30] = CLS_ID, SEP_ID
    ids[:, 31:] = PAD_ID
    mask = (ids != PAD_ID).long()
    out, labels = mlm_mask(ids, mask, vocab_size=30522, generator=g)
    picked = labels != -100
    assert not picked[:, [0, 30]].any() and not picked[:, 31:].any()  # [CLS], [SEP], [PAD] never chosen
    assert torch.equal(labels[picked], ids[picked])
    rate = picked.float().sum() / (mask.sum() - 2 * b)
    assert 0.14 < rate < 0.16, rate
    to_mask = (out[picked] == MASK_ID).float().mean()
    unchanged = (out[picked] == ids[picked]).float().mean()
    assert 0.77 < to_mask < 0.83 and 0.08 < unchanged < 0.12
    assert torch.equal(out[~picked], ids[~picked])


def test_whole_word_masking_masks_a_words_pieces_together():
    # "[CLS] the walk ##ing man ##ly run ##s [SEP]": pieces (##) take their word's lot
    ids = torch.tensor([[101, 5, 6, 7, 8, 9, 10, 11, 102]]).repeat(2000, 1)
    continues = torch.tensor([[False, False, False, True, False, True, False, True, False]]).repeat(2000, 1)
    out, labels = mlm_mask(ids, torch.ones_like(ids), 50, continues=continues, generator=torch.Generator().manual_seed(0))
    picked = labels != -100
    for word in ([2, 3], [4, 5], [6, 7]):
        assert (picked[:, word[0]] == picked[:, word[1]]).all()  # all or nothing
    assert 0.13 < picked[:, 1].float().mean() < 0.17 and 0.13 < picked[:, 2].float().mean() < 0.17  # 15% of words
    assert not picked[:, [0, 8]].any()
    _, alone = mlm_mask(ids, torch.ones_like(ids), 50, generator=torch.Generator().manual_seed(0))
    assert not ((alone[:, 2] != -100) == (alone[:, 3] != -100)).all()  # without it, pieces are picked alone


def test_mlm_loss_only_counts_picked_positions():
    logits = torch.randn(2, 5, 10)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3] = 4, 7
    expected = (torch.nn.functional.cross_entropy(logits[0, 1], torch.tensor(4)) +
                torch.nn.functional.cross_entropy(logits[1, 3], torch.tensor(7))) / 2
    assert torch.allclose(mlm_loss(logits, labels), expected)
    assert mlm_loss(logits, torch.full((2, 5), -100)) == 0  # nothing masked: no loss, no NaN


def test_contrastive_loss_small_for_matched_large_for_shuffled():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 64, generator=g)
    matched = contrastive_loss(emb, emb + 0.01 * torch.randn(16, 64, generator=g))
    shuffled = contrastive_loss(emb, emb[torch.roll(torch.arange(16), 1)])
    assert matched < 0.01 and shuffled > 10


def test_contrastive_loss_with_labels_treats_rows_of_one_label_as_pairs():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(16, 64, generator=g)
    assert torch.allclose(contrastive_loss(emb, emb, labels=torch.arange(16)), contrastive_loss(emb, emb), atol=1e-6)
    # two clips of one caption: without labels each is the other's negative, a loss that cannot go below 2 log 2 / 3
    # per direction; with labels it goes to 0 as the embeddings align
    dup, labels = torch.eye(3)[[0, 0, 1]], torch.tensor([7, 7, 2])
    assert contrastive_loss(dup, dup, 0.01) > 2 * (2 * math.log(2) / 3) - 1e-4
    assert contrastive_loss(dup, dup, 0.01, labels) < 1e-6


def test_vtm_batch_labels():
    video = torch.arange(10).float()[:, None, None]  # clip i holds value i
    paired, labels = vtm_batch(video, generator=torch.Generator().manual_seed(0))
    own = paired[:, 0, 0] == torch.arange(10)
    assert labels.sum() == 5 and torch.equal(own, labels.bool())  # matched pairs keep their clip, others do not
    with pytest.raises(ValueError, match="at least 2"):
        vtm_batch(video[:1])


def test_cosine_similarity_stays_float32_under_autocast():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.992, (1 - 0.992**2) ** 0.5], [0.994, (1 - 0.994**2) ** 0.5]])  # cosines 0.992 and 0.994
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a stand-in for a GPU's autocast
        sims = cosine_similarity(a, b)
        lossy = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
        loss = contrastive_loss(b, b)
    assert sims.dtype == torch.float32 and torch.allclose(sims, torch.tensor([[0.992, 0.994]]), atol=1e-6)
    assert lossy.dtype == torch.bfloat16 and lossy[0, 0] == lossy[0, 1]  # what bf16 would have made of them
    assert loss.dtype == torch.float32


def test_ranks_and_recall_on_hand_made_similarities():
    hits = torch.eye(5, dtype=torch.bool).repeat_interleave(4, 0)  # 5 clips x 4 captions: caption i belongs to clip i // 4
    perfect = hits.float()
    ranks = first_hit_ranks(perfect, hits)
    assert (ranks == 1).all() and recall_metrics(ranks, "t2v") == dict(t2v_r1=1.0, t2v_r5=1.0, t2v_r10=1.0, t2v_medr=1.0)
    assert (first_hit_ranks(perfect.T, hits.T) == 1).all()  # video to text: any of its 4 captions is a hit
    # a known ranking: every caption puts its clip at place 1 + (i % 5)
    sim = torch.zeros(20, 5)
    for i in range(20):
        order = [(i // 4 + j) % 5 for j in range(5)]  # wrong clips first
        place = i % 5
        ranked = order[1: place + 1] + [order[0]] + order[place + 1:]
        sim[i, ranked] = torch.tensor([5.0, 4, 3, 2, 1])
    ranks = first_hit_ranks(sim, hits)
    assert ranks.tolist() == [1 + i % 5 for i in range(20)]
    m = recall_metrics(ranks, "t2v")
    assert m == pytest.approx(dict(t2v_r1=4 / 20, t2v_r5=1.0, t2v_r10=1.0, t2v_medr=3.0))
    # ties count against the model; NaN ranks last
    assert first_hit_ranks(torch.zeros(20, 5), hits).tolist() == [5] * 20
    assert first_hit_ranks(torch.full((20, 5), float("nan")), hits).tolist() == [5] * 20
    assert strictly_best(torch.tensor([[1.0, 1.0], [2.0, 1.0], [float("nan"), 0.0]]), torch.tensor([0, 0, 0])).tolist() == [False, True, False]


# =====================================================================================================================
# train_tiny.py, above the banner: what `python train_tiny.py` runs


# --- the synthetic world and its tokens ------------------------------------------------------------------------------


def test_caption_grammar_time_variants_and_questions():
    assert len(tt.CAPTIONS) == 4 * 3 * 6
    i = tt.CAPTIONS.index(("red", "circle", "moves left"))
    variants = tt.time_variants(i)
    assert variants[0] == i and tt.CAPTIONS[variants[1]] == ("red", "circle", "moves right")
    assert len(set(variants)) == 6 and all(tt.CAPTIONS[j][:2] == ("red", "circle") for j in variants)
    looks = [tt.CAPTIONS[j] for j in tt.looks_variants(i)]
    assert len(set(looks)) == 5 and all(c[2] == "moves left" and (c[0] == "red") != (c[1] == "circle") for c in looks)
    # every answer follows from the caption: the words of the caption that the question asks about
    for j in range(len(tt.CAPTIONS)):
        text = tt.caption_text(j)
        answers = [tt.answer_to(j, kind) for kind in tt.QUESTIONS]
        assert text == f"a {answers[0]} {answers[1]} {answers[2]}" and all(a in tt.ANSWERS for a in answers)
    tok = tt.make_tokenizer("", tt.SYNTHETIC_TEXTS)
    assert tok.encode("A red circle moves left").tokens == ["[CLS]", "a", "red", "circle", "moves", "left", "[SEP]"]
    assert tok.encode("what does the shape do?").tokens[-3:] == ["do", "?", "[SEP]"]  # question words are known too
    unk = tok.token_to_id("[UNK]")
    assert all(unk not in tok.encode(t).ids for t in tt.SYNTHETIC_TEXTS)


def test_render_moves_the_shape_the_way_the_caption_says():
    g = torch.Generator().manual_seed(0)
    names = [("red", "square", m) for m in tt.MOTIONS]
    video = tt.render([tt.CAPTIONS.index(c) for c in names], 4, 32, g)
    assert video.shape == (6, 4, 3, 32, 32) and video.min() >= 0 and video.max() <= 1
    red = (video[:, :, 0] > 0.7) & (video[:, :, 1] < 0.4)  # (clip, frame, y, x)
    grid = torch.arange(32.0)
    for clip, (_, _, motion) in enumerate(names):
        present = red[clip].flatten(1).any(1)
        xs = [(grid[None, :] * red[clip, t]).sum() / red[clip, t].sum() for t in range(4) if present[t]]
        ys = [(grid[:, None] * red[clip, t]).sum() / red[clip, t].sum() for t in range(4) if present[t]]
        if motion == "moves left":
            assert xs[0] > xs[-1] + 5
        if motion == "moves right":
            assert xs[-1] > xs[0] + 5
        if motion == "moves up":
            assert ys[0] > ys[-1] + 5
        if motion == "moves down":
            assert ys[-1] > ys[0] + 5
        if motion == "appears":
            assert not present[0] and present[-1]
        if motion == "disappears":
            assert present[0] and not present[-1]


def test_bert_vocab_tokenizer_and_bad_vocab_files(tmp_path):
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "ball",
                                                               "roll", "##s", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = tt.make_tokenizer(tmp_path / "vocab.txt", [])
    assert tok.encode("A red ball, rolls").tokens == ["[CLS]", "a", "red", "ball", ",", "roll", "##s", "[SEP]"]
    assert [tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")] == [PAD_ID, CLS_ID, SEP_ID, MASK_ID]
    text = tt.Tokens(tok, 16)
    ids, mask = text(["a red ball rolls"] * 4000)
    _, labels = text.mask_words(ids, mask, len(words), torch.Generator().manual_seed(0))
    roll, s = (labels[:, 4] != -100), (labels[:, 5] != -100)  # "roll" "##s": one word, masked together
    assert torch.equal(roll, s) and 0.12 < roll.float().mean() < 0.18
    for content, message in [("a\nred\n", "lacks the special tokens"), ("\n".join(words + ["red"]), "line 111: 'red' again"),
                             ("\n".join(words[:50] + [""] + words[50:]), "line 51: blank")]:
        (tmp_path / "bad.txt").write_text(content)
        with pytest.raises(tt.BadInput, match=message):
            tt.make_tokenizer(tmp_path / "bad.txt", [])


# --- objectives and synthetic data -----------------------------------------------------------------------------------


def synthetic(opts, cfg, tokens, preprocess="ours", rank=0, world=1):
    return tt.Synthetic(opts, rank, world).prepare(opts, cfg, tokens, preprocess, [], torch.device("cpu"))


def tiny_setup(task="pretrain", **kw):
    opts = tt.Options(**{**tt.TASK_DEFAULTS[task], "task": task, "batch": 16, "vtm_clips": 8, "mlm_clips": 4, **kw})
    tok = tt.make_tokenizer("", tt.SYNTHETIC_TEXTS)
    cfg = Config.preset("nano", vocab_size=tok.get_vocab_size(), video_only_temporal=True, dropout=0.0,
                        mc_head=task == "mc", num_answers=len(tt.ANSWERS) if task == "qa" else 0)
    text = tt.Tokens(tok, cfg.max_text_len)
    torch.manual_seed(0)
    return opts, cfg, text, AllInOne(cfg), synthetic(opts, cfg, text)


def test_loss_goes_down_on_a_fixed_batch():
    opts, cfg, text, model, data = tiny_setup(mlm_clips=8)
    objective = tt.Pretrain(model, opts.temperature)
    batch = data.batch(0)
    assert (batch["mlm_labels"] != -100).sum() >= 2  # something to predict
    # every MLM caption's time word (its last token) is masked and predicted, besides BERT's random 15%
    rows, last = torch.arange(8), batch["mlm_mask"].sum(1) - 2
    time_words = {text.tok.token_to_id(w) for w in ("left", "right", "up", "down", "appears", "disappears")}
    assert (batch["mlm_ids"][rows, last] == text.mask_id).all() and set(batch["mlm_labels"][rows, last].tolist()) <= time_words
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        out = objective(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append({k: v.item() for k, v in out.items()})
    for k in ("loss", "vtm", "mlm", "bank", "itc"):
        assert losses[-1][k] < 0.8 * losses[0][k], (k, losses[0][k], losses[-1][k])


def test_mc_and_qa_objectives_on_known_scores():
    opts, cfg, text, model, data = tiny_setup("mc")
    batch = data.batch(0)
    out = tt.MultipleChoice(model)(batch)
    with torch.no_grad():  # by hand: every (clip, option) pair's score, cross-entropy over each clip's 5
        scores = torch.stack([model.mc_score(model(batch["video"], batch["options_ids"][:, j], batch["options_mask"][:, j]).pooled)
                              for j in range(5)], 1)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(scores, batch["answer"]), atol=1e-5)
    assert out["mc_acc"] == (scores.argmax(1) == batch["answer"]).float().mean()
    opts, cfg, text, model, data = tiny_setup("qa")
    batch = data.batch(0)
    answers = [tt.ANSWERS[a] for a in batch["answer"]]
    kinds = [list(tt.QUESTIONS)[list(data.question_ids.tolist()).index(q.tolist())] for q in batch["question_ids"]]
    assert all(a in (tt.COLOURS if k == "colour" else tt.SHAPES if k == "shape" else tt.MOTIONS) for a, k in zip(answers, kinds))
    out = tt.OpenQA(model.eval())(batch)  # eval: the head's dropout off
    with torch.no_grad():  # by hand: the QA head on the pooled joint feature, cross-entropy over the answers
        logits = model.qa_head(model(batch["video"], batch["question_ids"], batch["question_mask"]).pooled)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(logits, batch["answer"]), atol=1e-5)


def test_synthetic_batches_are_deterministic_and_split_among_processes():
    opts, cfg, text, model, data = tiny_setup()
    a, b = data.batch(3), data.batch(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(data.batch(4)["video"], a["video"])
    assert a["vtm_labels"].sum() == 4 and len(a["vtm_ids"]) == 8 and len(a["mlm_ids"]) == 4
    assert a["video"].min() == -1 and a["video"].max() == 1  # "ours": pixels in [-1, 1]
    # two processes: process r takes clips r, r + 2, ... of the same global batch, the VTM and MLM clips among them
    halves = [synthetic(opts, cfg, text, rank=r, world=2).batch(3) for r in (0, 1)]
    for key in a:
        if key in tt.Synthetic.shared:
            assert all(torch.equal(h[key], a[key]) for h in halves)
        else:
            assert all(torch.equal(h[key], a[key][r::2]) for r, h in enumerate(halves)), key
    assert torch.equal(halves[1]["video"][:4], a["video"][:8][1::2])  # its VTM clips come first


def test_vtm_mismatches_follow_the_curriculum():
    opts, cfg, text, model, data = tiny_setup(batch=400, vtm_clips=400, mlm_clips=0)

    def kinds(step):  # how each mismatched caption differs from its clip's caption
        batch = data.batch(step)
        bank = {tuple(row.tolist()): j for j, row in enumerate(data.bank_ids)}
        out = []
        for own, ids, label in zip(batch["bank_targets"], batch["vtm_ids"], batch["vtm_labels"]):
            a, b = tt.CAPTIONS[int(own)], tt.CAPTIONS[bank[tuple(ids.tolist())]]
            assert (a == b) == bool(label)
            if not label:
                out.append("time" if a[:2] == b[:2] else "looks" if a[2] == b[2] and (a[0] == b[0]) != (a[1] == b[1]) else "other")
        return {k: out.count(k) / len(out) for k in ("time", "looks", "other")}

    early, late = kinds(0), kinds(opts.horizon - 1)  # curriculum: 80% time-only mismatches, then 40%
    assert 0.7 < early["time"] < 0.9 and 0.3 < late["time"] < 0.55
    assert 0.2 < late["looks"] < 0.45 and 0.15 < late["other"] < 0.4  # the rest: half colour- or shape-only


def test_mc_option_sets_hold_the_answer_and_the_right_kind_of_distractors():
    opts, cfg, text, model, data = tiny_setup("mc")
    g = torch.Generator().manual_seed(0)
    captions = torch.randint(72, (200,), generator=g)
    for time_only in (True, False):
        options, answer = data.option_sets(captions, torch.full((200,), time_only), g)
        assert torch.equal(options[torch.arange(200), answer], captions)
        for row, own in zip(options.tolist(), captions.tolist()):
            assert len(set(row)) == 5
            others = [tt.CAPTIONS[j] for j in row if j != own]
            if time_only:
                assert all(o[:2] == tt.CAPTIONS[own][:2] for o in others)
    assert len(set(answer.tolist())) == 5  # the answer is not always in the same place


def test_held_out_is_new_compact_and_complete_for_each_task():
    opts, cfg, text, model, data = tiny_setup(eval_clips=24)
    held = data.held_out()
    assert held.video.dtype == torch.uint8 and held.video.shape == (24, 4, 3, 32, 32)
    train_video = ((data.batch(0)["video"] + 1) * 127.5).round().to(torch.uint8)
    assert not any(torch.equal(v, w) for v in held.video for w in train_video)  # new renders, not training clips
    bank = {tuple(row.tolist()): j for j, row in enumerate(data.bank_ids)}
    c = held.captions
    own = [bank[tuple(row.tolist())] for row in c.ids]
    assert own == c.label.tolist() == c.clip_label.tolist()
    assert [bank[tuple(row.tolist())] for row in c.swapped_ids] == [tt.time_swapped(j) for j in own]
    for row, j in zip(held.choices["mc_acc"].ids, own):  # zero-shot: its own caption first among its 6 time variants
        assert [bank[tuple(o.tolist())] for o in row] == tt.time_variants(j)
    # fine-tuning sets: the answer points at the clip's own caption; the time set differs from it only in time words
    captions = torch.randint(72, (24,), generator=torch.Generator().manual_seed(10_000_019)).tolist()
    _, _, _, _, mc = tiny_setup("mc", eval_clips=24)
    sets = mc.held_out().choices
    for name, choices in sets.items():
        options = [[bank[tuple(o.tolist())] for o in row] for row in choices.ids]
        assert [row[a] for row, a in zip(options, choices.answer.tolist())] == captions
        assert all(len(set(row)) == 5 for row in options)
        same_looks = [all(tt.CAPTIONS[o][:2] == tt.CAPTIONS[row[0]][:2] for o in row) for row in options]
        assert all(same_looks) if name == "mc_acc_time" else not all(same_looks)
    _, _, _, _, qa = tiny_setup("qa", eval_clips=24)
    q = qa.held_out().questions  # every question about every clip, with the answer the caption gives
    assert q.kinds == ["colour", "shape", "motion"] and q.clip.tolist() == [i // 3 for i in range(72)]
    assert [tt.ANSWERS[a] for a in q.answer] == [tt.answer_to(captions[i // 3], q.kinds[i % 3]) for i in range(72)]


def test_the_first_clips_of_a_held_out_set_bring_their_captions_choices_and_questions():
    opts, cfg, text, model, data = tiny_setup(eval_clips=24)
    held = data.held_out()
    first, made = held.first(10), data.held_out_of(held.captions.label[:10], held.video[:10], None)
    assert torch.equal(first.video, held.video[:10]) and held.first(24) is held
    for a, b in ((first.captions, made.captions), (first.choices["mc_acc"], made.choices["mc_acc"])):
        assert all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in tt.dataclasses.fields(a))
    c = held_out_of(5, 4, oracle_text()[0], list(range(5))).first(2).captions  # clips of several captions
    assert c.first.tolist() == [0, 4] and c.label.tolist() == [0] * 4 + [1] * 4 and c.clip_label.tolist() == [0, 1]
    _, _, _, _, mc = tiny_setup("mc", eval_clips=24)
    assert all(s.clip.tolist() == list(range(10)) for s in mc.held_out().first(10).choices.values())
    _, _, _, _, qa = tiny_setup("qa", eval_clips=24)
    q = qa.held_out().first(10).questions
    assert q.clip.tolist() == [i // 3 for i in range(30)] and len(q.answer) == len(q.kind) == len(q.ids) == 30


# --- the training loop -----------------------------------------------------------------------------------------------


def test_resume_with_non_default_options_gives_identical_weights(tmp_path, one_thread):
    flags = QUICK + ["--temporal", "none", "--lr", "3e-3", "--seed", "5", "--eval-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    tt.train(tt.parse_options(flags + ["--steps", "6", "--out", str(straight)]))
    tt.train(tt.parse_options(flags + ["--steps", "3", "--out", str(split)]))
    tt.train(tt.parse_options(["--steps", "6", "--out", str(split), "--resume"]))  # the rest comes from the checkpoint
    a, b = ckpt_of(straight), ckpt_of(split)
    assert a["step"] == b["step"] == 6 and b["config"]["temporal"] == "none" and b["options"]["lr"] == 3e-3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["tokenizer"] == b["tokenizer"] and a["config"] == b["config"] and a["scaler"] == b["scaler"] == {}
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for key in ("vtm_acc", "vtm_acc_temporal", "mlm_acc", "t2v_r1", "t2v_r10", "t2v_medr", "v2t_r5", "mc_acc",
                "clips", "captions", "clips_per_s", "wall_s"):
        assert key in rows[-1]
    # the checkpoint is self-contained: model, tokenizer, config
    model = AllInOne(Config(**a["config"]))
    model.load_state_dict(a["model"])
    assert tt.Tokenizer.from_str(a["tokenizer"]).encode("a red circle appears").ids[0] == 2  # [CLS]


def test_curve_rows_come_at_their_steps_and_change_nothing_else(tmp_path, one_thread):
    flags = QUICK + ["--steps", "6", "--eval-every", "3", "--curve-clips", "8", "--dropout", "0.1"]  # dropout: the
    curves, plain = tmp_path / "curves", tmp_path / "plain"  # training draws random numbers, evaluation must not
    tt.train(tt.parse_options(flags + ["--curve-every", "2", "--out", str(curves)]))
    tt.train(tt.parse_options(flags + ["--curve-every", "0", "--steps", "3", "--out", str(plain)]))
    assert tt.parse_options(["--resume", "--out", str(plain), "--curve-every", "5", "--curve-clips", "4"]).curve_every == 5
    old = ckpt_of(plain)  # a checkpoint from before --curve-every: its task's default (100), no curve row by step 6
    del old["options"]["curve_every"]
    torch.save(old, plain / "ckpt.pt")
    tt.train(tt.parse_options(["--resume", "--steps", "6", "--out", str(plain)]))
    a, b = ckpt_of(curves), ckpt_of(plain)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["options"]["curve_every"] == 2
    rows, plain_rows = ([json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()] for run in (curves, plain))
    timing = ("clips_per_s", "wall_s")
    full = [{k: v for k, v in r.items() if k not in timing} for r in rows if "kind" not in r]
    assert full == [{k: v for k, v in r.items() if k not in timing} for r in plain_rows] and len(full) == 2
    curve = [r for r in rows if r.get("kind") == "curve"]
    assert [r["step"] for r in curve] == [2, 4]  # not at 3 and 6: the full evaluations are the curve's points there
    for r in curve:
        assert (r["clips"], r["task"], r["temporal"]) == (8, "pretrain", "roll") and not set(timing) & set(r)
        assert all(0 <= r[k] <= 1 for k in ("vtm_acc_temporal", "mc_acc", "order_flip", "vtm_acc", "mlm_acc", "t2v_r1"))


def test_train_tiny_runs_where_pyav_is_not_installed(tmp_path):
    blocked = ("import runpy, sys; sys.modules['av'] = None  # import av now fails, as where it is not installed\n"
               f"sys.argv = ['train_tiny.py', *{QUICK + ['--steps', '3', '--out', str(tmp_path)]!r}]\n"
               f"runpy.run_path({str(HERE / 'train_tiny.py')!r}, run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and "eval step 3" in run.stdout, run.stderr[-3000:]
    companion = subprocess.run([sys.executable, "-c", blocked.replace("train_tiny.py'", "examples/train_videos.py'")],
                               capture_output=True, text=True)
    assert "import of av halted" in companion.stderr  # the block works: the companion, which decodes, needs av


def test_micro_batches_give_the_update_of_one_batch_for_vtm_mlm_and_the_caption_bank(one_thread):
    opts, cfg, text, model, data = tiny_setup()
    objective = tt.Pretrain(model, opts.temperature)
    batch = data.batch(0)
    assert (batch["mlm_labels"] != -100).sum() > 0

    def gradients(batches, n):
        model.zero_grad()
        itc = 0
        for b in batches:
            out = objective(b)
            ((out["vtm"] + out["mlm"] + out["bank"]) / n).backward()
            itc += out["itc"].item() / n
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, itc

    whole, itc_whole = gradients(tt.micro_batches(batch, 1, data.shared), 1)
    for n in (2, 4):
        micro = list(tt.micro_batches(batch, n, data.shared))
        assert [len(m["vtm_ids"]) for m in micro] == [8 // n] * n and torch.equal(micro[0]["text_ids"], batch["text_ids"])
        parts, itc_parts = gradients(micro, n)
        for k in whole:
            assert (whole[k] - parts[k]).abs().max() <= 1e-4 * whole[k].abs().max(), (n, k)  # float noise: 2.5e-5
        assert itc_parts < itc_whole  # the in-batch contrastive loss is not the same: fewer negatives per clip


def test_accum_trains_by_optimizer_steps_and_is_kept_on_resume(tmp_path, capsys):
    code, out, err = run_cli(QUICK + ["--accum", "2", "--steps", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert [line.split("|")[0].strip() for line in out.splitlines() if line.startswith("step")] == ["step     1/2", "step     2/2"]
    assert ckpt_of(tmp_path)["step"] == 2 and ckpt_of(tmp_path)["options"]["accum"] == 2
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "3", "--accum", "1"], capsys)
    assert code == 2 and "--accum 1 differs from the checkpoint's 2" in err
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "3", "--checkpointing"], capsys)
    assert code == 0 and ckpt_of(tmp_path)["step"] == 3  # checkpointing changes memory, not the run: it may change
    code, _, err = run_cli(QUICK + ["--accum", "3", "--steps", "1", "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and "--batch 8 does not divide among 1 process(es) x --accum 3 micro-batches" in err


def test_precision_fp16_and_bf16_on_the_cpu(tmp_path, capsys, monkeypatch):
    assert not tt.mixed_precision(torch.device("cpu"))[1].is_enabled()  # auto: fp32 on the CPU
    for precision, steps in (("bf16", 2), ("fp16", 4)):
        code, out, err = run_cli(QUICK + ["--precision", precision, "--steps", str(steps), "--eval-clips", "4", "--out",
                                          str(tmp_path / precision)], capsys)
        assert code == 0 and f"eval step {steps}" in out, err
        ckpt = ckpt_of(tmp_path / precision)
        skipped = round(math.log2(65536 / ckpt["scaler"]["scale"])) if precision == "fp16" else 0  # each halves it
        assert (ckpt["scaler"] != {}) == (precision == "fp16")  # a loss scaler for fp16 only
        assert all(state["step"] == steps - skipped for state in ckpt["optimizer"]["state"].values()) and skipped < steps
    # fp16 gradients that overflow: the loss scaler skips the step and lowers its scale; the NaN guard does not stop
    real = tt.mixed_precision
    monkeypatch.setattr(tt, "mixed_precision", lambda device, precision: (
        real(device, precision)[0], torch.amp.GradScaler("cpu", init_scale=2.0**100)))
    code, out, err = run_cli(QUICK + ["--precision", "fp16", "--steps", "3", "--eval-clips", "4", "--out",
                                      str(tmp_path / "over")], capsys)
    assert code == 0, err
    ckpt = ckpt_of(tmp_path / "over")
    assert ckpt["step"] == 3 and ckpt["scaler"]["scale"] == 2.0**97  # each of the 3 steps skipped, the scale halved
    assert all(state["step"] == 0 and not state["exp_avg"].any() for state in ckpt["optimizer"]["state"].values())
    monkeypatch.undo()
    # a real NaN under fp16 stops the run
    code, _, err = run_cli(QUICK + ["--precision", "fp16", "--lr", "1e30", "--steps", "6", "--out", str(tmp_path / "nan")],
                           capsys)
    assert code == 1 and "the loss or the weights are not finite" in err


def test_resume_on_another_device_that_runs_fp16_with_a_loss_scaler(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(QUICK + ["--steps", "2", "--out", str(tmp_path)], capsys)  # fp32: an empty scaler state
    assert code == 0 and ckpt_of(tmp_path)["scaler"] == {}, err
    real = tt.mixed_precision  # --precision auto on a GPU without bf16: fp16 and an enabled scaler
    monkeypatch.setattr(tt, "mixed_precision", lambda device, precision: (real(device, "fp16")[0],
                                                                          torch.amp.GradScaler("cpu")))
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "3"], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert ckpt_of(tmp_path)["step"] == 3 and ckpt_of(tmp_path)["scaler"]["scale"] > 0


def test_resume_on_fewer_gpus_restores_this_process_s_random_state(tmp_path, capsys, monkeypatch):
    """A run saved by 8 processes on 8 GPUs, resumed by one process on one GPU (CUDA's functions stood in for)."""
    run_cli(QUICK + ["--steps", "2", "--out", str(tmp_path)], capsys)
    ckpt = ckpt_of(tmp_path)
    ckpt["rng"] = [dict(torch=torch.manual_seed(r).get_state(), cuda=torch.full((16,), r + 1, dtype=torch.uint8))
                   for r in range(8)]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "3"], capsys)
    assert code == 0, err
    assert len(restored) == 1 and torch.equal(restored[0], torch.ones(16, dtype=torch.uint8))  # rank 0's GPU's state
    assert len(ckpt_of(tmp_path)["rng"]) == 1  # saved again by the one process


def test_a_short_pre_training_then_fine_tuning_beats_chance(tmp_path, one_thread):
    flags = ["--log-every", "50", "--device", "cpu", "--warmup", "5"]
    tt.train(tt.parse_options(flags + ["--steps", "30", "--batch", "32", "--vtm-clips", "8", "--mlm-clips", "4",
                                       "--eval-clips", "8", "--out", str(tmp_path / "pre")]))
    last = tt.train(tt.parse_options(flags + ["--task", "qa", "--init", str(tmp_path / "pre" / "ckpt.pt"), "--steps", "60",
                                              "--lr", "2e-3", "--eval-clips", "48", "--out", str(tmp_path / "qa")]))
    assert last["qa_acc_colour"] > 0.4  # chance 1/4; seeds 0, 1, 2 reach 0.58-0.65


# --- evaluation, on a stand-in model whose scores are known ----------------------------------------------------------


class Oracle(torch.nn.Module):
    """A stand-in for AllInOne whose scores are known: a clip's number is in its first pixel, a text's in its first
    word; clip c matches the texts whose word is truth[c]. Video-only features point at `shown[c]`."""

    def __init__(self, truth, shown=None, vocab=40, answers=0, flat=False):
        super().__init__()
        self.truth, self.shown, self.flat, self.vocab = truth, truth if shown is None else shown, flat, vocab
        self.cfg = SimpleNamespace(vocab_size=vocab, mc_head=False, num_answers=answers)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.text_proj = self.video_proj = self.mlm_head = torch.nn.Identity()
        self.vtm_head = self.qa_head = torch.nn.Identity()

    def clip(self, video):
        return ((video[:, 0, 0, 0, 0] + 1) * 127.5).round().long()

    def forward(self, video, ids, mask):
        match = (self.truth[self.clip(video)] == ids[:, 1]).float()
        pooled = torch.stack([1 - match, match], 1) * (0 if self.flat else 1)  # VTM logits (no match, match)
        if self.cfg.num_answers:  # QA: answer = the clip's number, when the question's word is 1
            pooled = torch.nn.functional.one_hot(self.clip(video) % self.cfg.num_answers, self.cfg.num_answers).float()
            pooled = pooled * (ids[:, 1:2] == 1) * (0 if self.flat else 1)
        text = torch.nn.functional.one_hot(ids, self.vocab).float() * (0 if self.flat else 1)  # MLM: the word it sees
        return Output(text=text, video=None, pooled=pooled)

    def encode_text(self, ids, mask):
        return Output(text=torch.nn.functional.one_hot(ids[:, 1:2], self.vocab).float(), video=None, pooled=None)

    def encode_video(self, video):
        return Output(text=None, video=torch.nn.functional.one_hot(self.shown[self.clip(video)], self.vocab)[:, None].float(),
                      pooled=None)

    def mc_score(self, pooled):
        return pooled[:, 1]

    score_options = AllInOne.score_options  # each clip with each option, through forward and mc_score


def held_out_of(n_clips, captions_per_clip, text, words):
    """A held-out set: clip c has captions_per_clip captions, all with the word words[c]."""
    video = torch.zeros(n_clips, 2, 3, 4, 4, dtype=torch.uint8)
    video[:, 0, 0, 0, 0] = torch.arange(n_clips, dtype=torch.uint8)
    captions = [f"w{words[c]} x{k}" for c in range(n_clips) for k in range(captions_per_clip)]
    ids, mask = text(captions)
    clip = torch.arange(n_clips).repeat_interleave(captions_per_clip)
    return tt.HeldOut(video, tt.Captions(ids, mask, first=torch.arange(n_clips) * captions_per_clip, label=clip,
                                         clip_label=torch.arange(n_clips), text=torch.arange(len(captions))))


def oracle_text():
    words = [f"w{i}" for i in range(20)] + [f"x{k}" for k in range(4)] + ["what", "is", "it"]
    tok = tt.make_tokenizer("", words)
    return tt.Tokens(tok, 8), tok


def test_evaluate_on_an_oracle_gives_the_known_numbers():
    text, tok = oracle_text()
    word = {c: tok.token_to_id(f"w{c}") for c in range(20)}
    held = held_out_of(5, 4, text, list(range(5)))
    truth = torch.tensor([word[c] for c in range(5)])
    m, notes = tt.evaluate(Oracle(truth), held, text, contextlib.nullcontext(), "ours")
    assert notes == [] and m["clips"] == 5 and m["captions"] == 20
    assert m["vtm_acc"] == 1.0
    for direction in ("t2v", "v2t"):
        assert (m[f"{direction}_r1"], m[f"{direction}_medr"]) == (1.0, 1.0)
    # MLM: the oracle predicts the word it sees, so exactly the picked words left unchanged are right
    c = held.captions
    masked, labels = text.mask_words(c.ids[c.first], c.mask[c.first], tok.get_vocab_size(),
                                     torch.Generator().manual_seed(2))
    picked = labels != -100
    assert m["mlm_acc"] == pytest.approx((masked[picked] == labels[picked]).float().mean().item())
    # video features shifted by one clip: every t2v query finds its clip second (the wrong clip first)
    shifted = Oracle(truth, shown=truth.roll(1))
    m, _ = tt.evaluate(shifted, held, text, contextlib.nullcontext(), "ours")
    assert m["t2v_r1"] == 0 and m["t2v_medr"] == 5.0 and m["v2t_r1"] == 0  # its own features are never ranked first
    # a model that scores everything the same is never right
    m, _ = tt.evaluate(Oracle(truth, flat=True), held, text, contextlib.nullcontext(), "ours")
    assert m["vtm_acc"] == 0 and m["mlm_acc"] == 0 and m["t2v_r1"] == 1.0  # (its retrieval features are right)
    # multiple choice: options are captions of clips 0..4, the answer at a known place
    options = torch.tensor([[(c + j) % 5 for j in range(5)] for c in range(5)])  # answer = option 0, the own word
    held.choices["mc_acc"] = tt.Choices(c.ids[options * 4], c.mask[options * 4], torch.arange(5),
                                        torch.zeros(5, dtype=torch.long))
    assert tt.evaluate(Oracle(truth), held, text, contextlib.nullcontext(), "ours")[0]["mc_acc"] == 1.0
    assert tt.evaluate(Oracle(truth, flat=True), held, text, contextlib.nullcontext(), "ours")[0]["mc_acc"] == 0.0


def test_evaluate_leaves_out_what_means_nothing():
    text, tok = oracle_text()
    word = {c: tok.token_to_id(f"w{c}") for c in range(20)}
    one = held_out_of(1, 3, text, [0])
    m, notes = tt.evaluate(Oracle(torch.tensor([word[0]])), one, text, contextlib.nullcontext(), "ours")
    assert "vtm_acc" not in m and "t2v_r1" not in m and m["clips"] == 1 and m["captions"] == 3
    assert any("vtm_acc left out: it needs a caption of another" in n for n in notes) and any("retrieval left out" in n for n in notes)
    held = held_out_of(3, 1, text, [0, 1, 2])
    m, notes = tt.evaluate(Oracle(torch.tensor([word[c] for c in range(3)])), held, text, contextlib.nullcontext(), "ours",
                           untrained={"text_proj", "video_proj", "mlm_head"})
    assert "t2v_r1" not in m and "mlm_acc" not in m and m["vtm_acc"] == 1.0
    assert "retrieval left out: text_proj and video_proj never trained (chance numbers)" in notes
    blank = held_out_of(2, 1, text, [0, 1])
    blank.captions.ids[:, 1:], blank.captions.mask[:, 1:] = 0, 0  # [CLS] alone: nothing to mask
    m, notes = tt.evaluate(Oracle(torch.tensor([word[0], word[1]])), blank, text, contextlib.nullcontext(), "ours")
    assert "mlm_acc" not in m and any("no held-out caption has a word to mask" in n for n in notes)


class FrameOrderStub(torch.nn.Module):
    """Scores a caption +1 for frames in increasing order (the frame index is in the first pixel), -1 for decreasing,
    and the negative for captions whose word is `swapped`: a model whose every decision is the frames' order."""

    def __init__(self, swapped):
        super().__init__()
        self.swapped, self.cfg = swapped, SimpleNamespace(vocab_size=40, mc_head=False)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vtm_head = torch.nn.Identity()

    def forward(self, video, ids, mask):
        order = torch.sign(video[:, -1, 0, 0, 0] - video[:, 0, 0, 0, 0]) * torch.where(ids[:, 1] == self.swapped, -1, 1)
        return Output(text=None, video=None, pooled=torch.stack([-order, order], 1))


def test_the_frame_order_test_flips_for_order_and_not_without_it(one_thread):
    text, tok = oracle_text()
    held = held_out_of(6, 1, text, list(range(6)))
    held.video = torch.arange(3, dtype=torch.uint8)[None, :, None, None, None].expand(6, 3, 3, 4, 4) * 40 + 10
    c = held.captions
    c.swapped_ids, c.swapped_mask = c.ids.clone(), c.mask.clone()
    c.swapped_ids[:, 1] = tok.token_to_id("w19")  # every clip's "time-swapped" caption
    m, _ = tt.evaluate(FrameOrderStub(tok.token_to_id("w19")), held, text, contextlib.nullcontext(), "ours",
                       untrained={"mlm_head", "text_proj", "video_proj"})
    assert m["vtm_acc_temporal"] == 1.0 and m["order_flip"] == 1.0  # every decision changes with the frames reversed
    # a model that cannot see order (no rolling, no time embedding) on the synthetic world: nothing flips
    opts, cfg, text, model, data = tiny_setup(eval_clips=64)
    cfg = replace(cfg, temporal="none", video_only_temporal=False)
    torch.manual_seed(0)
    blind = AllInOne(cfg)
    blind.video_embed.temporal.data.zero_()
    held = synthetic(opts, cfg, text).held_out()
    assert not all(torch.equal(clip[0], clip[-1]) for clip in held.video)  # the frames differ
    m, _ = tt.evaluate(blind, held, text, contextlib.nullcontext(), "ours")
    assert m["order_flip"] == 0.0 and m["vtm_acc_temporal_shuffled"] == m["vtm_acc_temporal"]
    # --order-test: the main metrics again with the frames reversed and shuffled; the blind model's are the same
    m, _ = tt.evaluate(blind, held, text, contextlib.nullcontext(), "ours", order_test=True)
    for suffix in ("reversed", "shuffled"):
        assert all(m[f"{k}_{suffix}"] == m[k] for k in ("t2v_r1", "v2t_r1", "vtm_acc", "mc_acc")), suffix
    assert tt.frame_orders(2).keys() == {"reversed"} and tt.frame_orders(4)["shuffled"].tolist() not in ([0, 1, 2, 3],
                                                                                                          [3, 2, 1, 0])


def test_evaluation_chunks_are_the_training_micro_batch(tmp_path, capsys, monkeypatch):
    chunks, real = set(), tt.Passes.run
    monkeypatch.setattr(tt.Passes, "run", lambda self, what, n, fn, chunk=None: chunks.add(chunk or self.chunk)
                        or real(self, what, n, fn, chunk))
    code, _, err = run_cli(QUICK + ["--accum", "2", "--steps", "1", "--eval-clips", "12", "--out", str(tmp_path)], capsys)
    assert code == 0 and chunks == {4, 1}, (chunks, err)  # --batch 8 / --accum 2; multiple choice: 4 // 6 options, 1


def test_qa_accuracy_counts_unknown_answers_wrong():
    text, tok = oracle_text()
    video = torch.zeros(4, 2, 3, 4, 4, dtype=torch.uint8)
    video[:, 0, 0, 0, 0] = torch.arange(4, dtype=torch.uint8)
    ids, mask = text(["what is it"] * 4)
    ids[:, 1] = 1  # the oracle answers questions whose first word is 1
    held = tt.HeldOut(video, questions=tt.Questions(ids, mask, torch.arange(4), answer=torch.tensor([0, 1, 0, -1]),
                                                    kind=torch.tensor([0, 0, 1, 1]), kinds=["a", "b"]))
    m, _ = tt.evaluate(Oracle(torch.zeros(4, dtype=torch.long), answers=3), held, text, contextlib.nullcontext(), "ours")
    # answers: clip 0 -> 0 (right), 1 -> 1 (right), 2 -> 2 (truth 0: wrong), 3 -> unknown (wrong)
    assert m["qa_acc"] == 0.5 and m["qa_acc_a"] == 1.0 and m["qa_acc_b"] == 0.0 and m["qa_unknown_answers"] == 0.25


# =====================================================================================================================
# train_tiny.py, below the banner: the toolbox


# --- options ---------------------------------------------------------------------------------------------------------


def test_bad_options_give_one_clear_message(tmp_path, capsys):
    cases = [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--temporal", "shift"], "--temporal must be roll, none or flatten"),
        (["--task", "vqa"], "--task must be pretrain, mc or qa"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--eval-every", "0"], "--eval-every must be at least 1"),
        (["--log-every", "0"], "--log-every must be at least 1"),
        (["--curve-every", "-1"], "--curve-every must be 0 or more"),
        (["--ckpt-every", "-1"], "--ckpt-every must be at least 1"),
        (["--batch", "ten"], "invalid int value"),
        (["--temperature", "0"], "--temperature must be a positive number"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--lr", "inf"], "--lr must be a positive number"),
        (["--weight-decay", "nan"], "--weight-decay must be 0 or more"),
        (["--dropout", "2"], "--dropout must be in [0, 1)"),
        (["--curriculum", "1.5"], "--curriculum must be between 0 and 1"),
        (["--precision", "fp8"], "--precision must be auto, fp32, bf16 or fp16"),
        (["--accum", "0"], "--accum must be at least 1"),
        (["--data", "clips.csv"], "unrecognized arguments: --data"),  # your own videos: examples/train_videos.py
        (["--vocab", str(tmp_path)], f"--vocab {tmp_path}: no such file"),
        (["--init", "x.ckpt"], "--init x.ckpt: no such file"),
        (["--eval-only"], "--eval-only needs a model"),
        (["--resume", "--out", str(tmp_path / "none")], "--resume: no checkpoint at"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    for argv, message in [(["--val-share", "1"], "--val-share must be between 0 and 1"),
                          (["--max-bad-share", "-0.1"], "--max-bad-share must be between 0 and 1"),
                          (["--workers", "-1"], "--workers must be 0 or more"),
                          (["--data", "no/such.csv"], "--data no/such.csv: no such file"),
                          (["--steps", "5"], "no data: --data"),
                          (["--lr", "0", "--steps", "5"], "--lr must be a positive number")]:
        code, _, err = run_cli(argv, capsys, main=tv.main)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    for argv, message in [(["--fold-div", "1"], "cannot build the model: temporal rolling needs"),
                          (["--frames", "1", "--temporal", "roll", "--fold-div", "20"], "cannot build the model")]:
        code, _, err = run_cli(QUICK + argv + ["--out", str(tmp_path / "x")], capsys)
        assert code == 1 and message in err and "Traceback" not in err, (argv, err)


def test_resume_refuses_a_flag_that_would_change_the_run(tmp_path, capsys):
    tt.train(tt.parse_options(QUICK + ["--steps", "2", "--out", str(tmp_path)]))
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "4", "--batch", "16"], capsys)
    assert code == 2 and "--batch 16 differs from the checkpoint's 8" in err and "--steps" in err
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--temporal", "flatten"], capsys)
    assert code == 2 and "--temporal 'flatten' differs from the checkpoint's 'roll'" in err
    code, out, _ = run_cli(["--resume", "--out", str(tmp_path), "--steps", "3", "--log-every", "5", "--order-test"], capsys)
    assert code == 0 and ckpt_of(tmp_path)["step"] == 3
    code, _, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "4"], capsys, main=tv.main)
    assert code == 2 and "no data: --data" in err  # a synthetic run goes on in train_tiny.py


def test_readme_commands_parse():
    """Every `python train_tiny.py ...` and `python examples/train_videos.py ...` command in the README and the two
    files' docstrings takes only options of its script."""
    texts = "\n".join([(HERE / "README.md").read_text(), tt.__doc__, tv.__doc__])
    for script, options, least in (("train_tiny.py", tt.Options, 8), ("examples/train_videos.py", tv.VideoOptions, 5)):
        commands = [line.split(script, 1)[1].split("#")[0].split() for line in texts.splitlines()
                    if line.strip().startswith(("python", "torchrun")) and f" {script}" in line]
        assert len(commands) >= least, script
        known = {"--" + f.name.replace("_", "-") for f in tt.dataclasses.fields(options)} | {"--help"}
        for argv in commands:
            flags = [a.split("=")[0] for a in argv if a.startswith("--") and a != "--nproc_per_node"]
            assert set(flags) <= known, (script, argv, set(flags) - known)


# --- start points ----------------------------------------------------------------------------------------------------


def test_init_from_an_official_checkpoint_needs_vocab_and_heads(tmp_path, capsys, official, monkeypatch):
    words = ["[PAD]"] + [f"w{i}" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"v{i}" for i in range(24)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.save(official["state_dict"], tmp_path / "plain.pt")  # no hyper-parameters: 2 heads of 32 cannot be read
    flags = QUICK + ["--steps", "1", "--eval-clips", "4", "--vocab", str(tmp_path / "vocab.txt")]
    code, _, err = run_cli(flags + ["--init", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "a")], capsys)
    assert code == 1 and "--attention-heads" in err
    code, out, err = run_cli(flags + ["--init", str(tmp_path / "plain.pt"), "--attention-heads", "2", "--frames", "2", "--out",
                                      str(tmp_path / "b")], capsys)
    assert code == 0, err
    ckpt = ckpt_of(tmp_path / "b")
    assert ckpt["config"]["frames"] == 2 and ckpt["config"]["heads"] == 2 and ckpt["preprocess"] == "official"
    assert ckpt["model"]["video_embed.temporal"].shape == (1, 2, 64)  # the official 4 frames, cropped to 2
    lightning = lightning_checkpoint(tmp_path / "official.ckpt", monkeypatch, state_dict=official["state_dict"],
                                     hyper_parameters=dict(config=dict(num_heads=2)))
    code, _, err = run_cli(QUICK + ["--init", str(lightning), "--out", str(tmp_path / "c")], capsys)
    assert code == 1 and "needs its BERT vocabulary, --vocab" in err


def test_crafted_checkpoints_run_no_code_through_the_command_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    for via in ("exec", "system"):
        code, _, err = run_cli(QUICK + ["--init", str(craft(tmp_path / f"{via}.pt", marker, via)), "--out",
                                        str(tmp_path / "o")], capsys)
        assert code == 1 and "error: --init" in err and not marker.exists(), err
    (tmp_path / "r").mkdir()
    craft(tmp_path / "r" / "ckpt.pt", marker)
    code, _, err = run_cli(QUICK + ["--resume", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "not a train_tiny.py checkpoint" in err and not marker.exists()


def test_answer_vocabulary_top_n_with_ties_in_a_fixed_order():
    clips = SimpleNamespace(rows=[dict(answer=a) for a in ["dog", "cat", "cat", "bird", "ant", "dog", "eel"]],
                            opts=SimpleNamespace(answers=0))
    assert tv.Clips.answer_vocabulary(clips) == ["cat", "dog", "ant", "bird", "eel"]
    clips.opts.answers = 3
    assert tv.Clips.answer_vocabulary(clips) == ["cat", "dog", "ant"]
    assert tt.Synthetic(tt.Options()).answer_vocabulary() == tt.ANSWERS


# --- checkpoints, the run folder, the other entry points -------------------------------------------------------------


def test_write_file_keeps_the_previous_file_when_interrupted(tmp_path):
    path = tmp_path / "ckpt.pt"
    umask = os.umask(0o27)  # a new file gets 0o666 less the umask, not the temporary file's private 0o600
    try:
        tt.write_file(path, lambda f: torch.save({"step": 1}, f))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640

    def broken(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        tt.write_file(path, broken)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@contextlib.contextmanager
def small_disk(path, megabytes, monkeypatch):
    """A folder on a disk of this size: a tmpfs where the system lets us mount one, else a folder whose writes (through
    tt.write_file and tt.append_line) fail with "No space left on device" once this many bytes have gone in."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    if not mounted:
        room = [megabytes << 20]

        class Small(io.FileIO):
            def write(self, data):
                room[0] -= len(data)
                if room[0] < 0:
                    raise OSError(28, "No space left on device")
                return super().write(data)

        def small_open(file, mode="r", **kwargs):  # binary files on the small disk; text ones (the lock) as usual
            return Small(file, mode.replace("b", "")) if "b" in mode else open(file, mode, **kwargs)

        monkeypatch.setattr(tt, "open", small_open, raising=False)
        monkeypatch.setattr(tt.os, "fdopen", lambda fd, mode: io.BufferedWriter(Small(fd, "w")))
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_is_one_clear_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "disk"
    with small_disk(out, 6, monkeypatch):  # room for one nano checkpoint (3.6 MB), not two
        code, stdout, err = run_cli(QUICK + ["--steps", "6", "--ckpt-every", "3", "--eval-every", "100",
                                             "--out", str(out)], capsys)
        assert code == 1 and "Traceback" not in err and "inline_container" not in err, err
        assert (f"error: step 6: cannot write {out / 'ckpt.pt'}: No space left on device; {out / 'ckpt.pt'} of step 3 "
                "is kept: --resume continues from it once there is space") in err
        assert ckpt_of(out)["step"] == 3 and not list(out.glob("*.tmp"))
        # a line that does not fit: nothing of it stays
        before = (out / "metrics.jsonl").read_bytes() if (out / "metrics.jsonl").exists() else b""
        with pytest.raises(tt.BadInput, match="cannot add to .*metrics.jsonl: No space left on device"):
            tt.append_line(out / "metrics.jsonl", "x" * (8 << 20))
        assert ((out / "metrics.jsonl").read_bytes() if (out / "metrics.jsonl").exists() else b"") == before
    with small_disk(tmp_path / "small", 1, monkeypatch):  # --samples output that does not fit
        code, _, err = run_cli(["--samples", "400", "--out", str(tmp_path / "small")], capsys, main=tv.main)
        assert code == 1 and f"error: cannot write {tmp_path / 'small'}" in err and "No space left on device" in err, err
        assert "Traceback" not in err


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    tt.train(tt.parse_options(QUICK + ["--steps", "3", "--out", str(tmp_path)]))
    before = (tmp_path / "ckpt.pt").read_bytes()
    code, _, err = run_cli(QUICK + ["--steps", "2", "--out", str(tmp_path)], capsys)
    assert code == 1 and "holds a run (ckpt.pt, metrics.jsonl): --resume continues it, --restart" in err
    assert "Traceback" not in err and (tmp_path / "ckpt.pt").read_bytes() == before
    code, out, _ = run_cli(QUICK + ["--steps", "2", "--out", str(tmp_path), "--restart"], capsys)
    assert code == 0 and ckpt_of(tmp_path)["step"] == 2
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "ckpt.pt").read_bytes() == before
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]  # one run


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    cmd = [sys.executable, str(HERE / "train_tiny.py"), *QUICK, "--steps", "100000", "--out", str(tmp_path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in first.stdout:
        if line.startswith("step     2/"):
            break
    second = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 1 and f"--out {tmp_path} is in use by another run (process {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    (tmp_path / f"ckpt.pt.{first.pid}.tmp").write_bytes(b"a write cut short")  # what a kill mid-write leaves
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    third = subprocess.run(cmd[:-4] + ["--steps", "2", "--out", str(tmp_path), "--restart"], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert third.returncode == 0, third.stderr[-2000:]
    assert not list(tmp_path.glob("*.tmp")) and ckpt_of(tmp_path)["step"] == 2


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    tt.train(tt.parse_options(QUICK + ["--steps", "2", "--out", str(tmp_path), "--ckpt-every", "1"]))
    good = (tmp_path / "ckpt.pt").read_bytes()
    code, out, err = run_cli(["--resume", "--out", str(tmp_path), "--steps", "6", "--lr", "1e30"], capsys)
    assert code == 2  # a resumed run keeps its --lr: start a fresh one with it
    code, out, err = run_cli(QUICK + ["--steps", "6", "--out", str(tmp_path / "nan"), "--lr", "1e30", "--ckpt-every", "1"], capsys)
    assert code == 1 and "the loss or the weights are not finite" in err and "Traceback" not in err
    step = int(err.split("error: step ")[1].split(":")[0])
    saved = ckpt_of(tmp_path / "nan") if (tmp_path / "nan" / "ckpt.pt").exists() else None
    assert saved is None or (saved["step"] < step and all(torch.isfinite(v).all() for v in saved["model"].values()))
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_crash_in_evaluation_leaves_the_steps_checkpoint(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation fell over")

    monkeypatch.setattr(tt, "evaluate", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        tt.train(tt.parse_options(QUICK + ["--steps", "4", "--eval-every", "2", "--out", str(tmp_path)]))
    assert ckpt_of(tmp_path)["step"] == 2


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path):
    cmd = [sys.executable, str(HERE / "train_tiny.py"), *QUICK, "--steps", "100000", "--out", str(tmp_path)]
    # a shell's background job ignores Ctrl-C, and its children inherit that: give the run the default handling
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until it trains
        if line.startswith("step     3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted at step" in rest
    ckpt = ckpt_of(tmp_path)
    assert ckpt["step"] >= 3 and f"interrupted at step {ckpt['step']}" in rest


def test_eval_only_writes_metrics_and_no_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    tt.train(tt.parse_options(QUICK + ["--steps", "2", "--out", str(run)]))
    before = (run / "ckpt.pt").read_bytes()
    code, out, _ = run_cli(["--eval-only", "--resume", "--out", str(run), "--eval-clips", "8"], capsys)
    assert code == 0 and (run / "ckpt.pt").read_bytes() == before
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_only"] and rows[-1]["clips"] == 8 and rows[-1]["step"] == 2 and "t2v_medr" in out
    for _ in range(2):  # evaluations may share a folder
        code, out, err = run_cli(["--eval-only", "--init", str(run / "ckpt.pt"), "--out", str(tmp_path / "ev"),
                                  "--eval-clips", "16"], capsys)
        assert code == 0, err
    assert not (tmp_path / "ev" / "ckpt.pt").exists() and not list((tmp_path / "ev").glob("*.pt"))  # no optimizer state
    rows = [json.loads(r) for r in (tmp_path / "ev" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["checkpoint"] == str(run / "ckpt.pt") and rows[0]["vtm_acc"] == rows[1]["vtm_acc"]
    code, _, err = run_cli(QUICK + ["--steps", "1", "--out", str(tmp_path / "ev")], capsys)
    assert code == 1 and "holds a run (metrics.jsonl)" in err  # but a training run does not share it


def test_ablation_trains_each_temporal_mode_in_its_folder_and_prints_one_table(tmp_path, capsys):
    code, out, err = run_cli(QUICK + ["--ablation", "--steps", "2", "--curve-every", "1", "--eval-clips", "4", "--out",
                                      str(tmp_path)], capsys)
    assert code == 0, err
    header, *rows = out.splitlines()[-4:]
    assert header.split()[:4] == ["temporal", "vtm_acc", "vtm_acc_temporal", "order_flip"]
    for mode, row in zip(("roll", "none", "flatten"), rows):
        curve, saved = [json.loads(r) for r in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert ckpt_of(tmp_path / mode)["config"]["temporal"] == mode and saved["temporal"] == mode
        assert (curve["kind"], curve["step"], curve["temporal"]) == ("curve", 1, mode)
        assert row.split()[:4] == [mode] + [f"{saved[k]:.3f}" for k in ("vtm_acc", "vtm_acc_temporal", "order_flip")]


def test_samples_write_the_synthetic_world_as_lossless_videos_and_data_files(tmp_path):
    tv.write_samples(tt.parse_options(["--samples", "75", "--out", str(tmp_path)], tv.VideoOptions))
    with av.open(str(tmp_path / "samples.png")) as c:
        frame = next(c.decode(video=0))
    assert (frame.width, frame.height) == (4 * 4 * 33, 72 * 4 * 32)  # 4 frames and a line after each; 72 clips at most
    assert len((tmp_path / "samples.txt").read_text().splitlines()) == 72
    captions, video = tv.new_clips(Config.preset("nano"), 75)
    assert captions.tolist() == [k % 72 for k in range(75)]
    for k in (0, 41, 74):  # every decoded pixel as rendered
        assert torch.equal(tv.decode_clip(tmp_path / "clips" / f"clip{k:05d}.mp4", 4, 32), video[k])
    kind, rows = tv.read_rows(tmp_path / "captions.csv")
    assert kind == "captions" and [r["caption"] for r in rows] == [tt.caption_text(k % 72) for k in range(75)]
    assert rows[74]["video"] == str(tmp_path / "clips" / "clip00074.mp4")
    kind, rows = tv.read_rows(tmp_path / "mc.jsonl")
    assert kind == "mc" and len(rows) == 75
    for k, r in enumerate(rows):  # its own caption among the 6 that differ only in the time words
        assert r["options"][r["answer"]] == tt.caption_text(k % 72)
        assert sorted(r["options"]) == sorted(tt.caption_text(j) for j in tt.time_variants(k % 72))
    assert len({r["answer"] for r in rows}) > 1  # not always in the same place
    kind, rows = tv.read_rows(tmp_path / "qa.csv")
    assert kind == "qa" and [(r["type"], r["answer"]) for r in rows[:3]] == [("colour", "red"), ("shape", "square"),
                                                                               ("motion", "moves left")]


def test_the_world_as_files_gives_the_metrics_of_the_rendered_clips(tmp_path, capsys, one_thread):
    tt.train(tt.parse_options(QUICK + ["--steps", "3", "--out", str(tmp_path / "run")]))
    tv.write_samples(tt.parse_options(["--samples", "72", "--out", str(tmp_path / "world")], tv.VideoOptions))
    model, text, preprocess, untrained = tv.load_model(tmp_path / "run" / "ckpt.pt")
    opts = tt.parse_options(["--eval-only", "--init", str(tmp_path / "run" / "ckpt.pt"), "--eval-clips", "72"])
    captions, video = tv.new_clips(model.cfg, 72)
    held = synthetic(opts, model.cfg, text, preprocess).held_out_of(captions, video, None)
    rendered, _ = tt.evaluate(model, held, text, contextlib.nullcontext(), preprocess, untrained)
    for name, keys in (("captions.csv", ("vtm_acc", "t2v_r1", "v2t_r1", "t2v_medr")), ("mc.jsonl", ("mc_acc",))):
        code, _, err = run_cli(["--eval-only", "--init", str(tmp_path / "run" / "ckpt.pt"), "--val-data",
                                str(tmp_path / "world" / name), "--workers", "0", "--out", str(tmp_path / name)], capsys, main=tv.main)
        assert code == 0, err
        files = json.loads((tmp_path / name / "metrics.jsonl").read_text())
        assert files["clips"] == 72 and {k: files[k] for k in keys} == {k: rendered[k] for k in keys}, name


# --- several processes -----------------------------------------------------------------------------------------------


def test_two_processes_compute_what_one_process_computes(tmp_path):
    flags = QUICK + ["--steps", "1", "--eval-clips", "4", "--mlm-clips", "4", "--dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(HERE / "train_tiny.py"), *flags, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and two.stdout.count("eval ") == 1  # rank 0 alone logs and evaluates
    assert "Warning" not in two.stderr, two.stderr[-2000:]
    one = subprocess.run([sys.executable, str(HERE / "train_tiny.py"), *flags, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = ckpt_of(tmp_path / "one"), ckpt_of(tmp_path / "two")
    # the gradients (AdamW's first moment after one step is 0.1 x the clipped gradient), to float tolerance
    for i, state in a["optimizer"]["state"].items():
        m1, m2 = state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert (m1 - m2).abs().max() <= 5e-5 * m1.abs().max() + 1e-12, i
        assert state["step"] == b["optimizer"]["state"][i]["step"] == 1, i
    # (not the weights: Adam's first step is +-lr wherever a gradient is float noise around zero, as the key biases'
    # are, so their sign can differ between the two runs)
    # --accum 2 under DDP: the first micro-batch's backward does not sync (no_sync), the last one does
    accum = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(HERE / "train_tiny.py"), *flags, "--accum", "2", "--out", str(tmp_path / "accum")],
                           capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert accum.returncode == 0 and "Warning" not in accum.stderr, accum.stderr[-3000:]
    assert ckpt_of(tmp_path / "accum")["step"] == 1
    rng = ckpt_of(tmp_path / "two")["rng"]  # each process its own dropout masks, and its random state kept
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"]) and len(a["rng"]) == 1


def test_torchrun_on_mps_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("mps"))
    with pytest.raises(tt.BadInput, match="torchrun runs on CUDA GPUs .* or on the CPU"):
        tt.start_processes(tt.Options())
    assert not tt.dist.is_initialized()


def test_torchrun_ablation_and_your_own_videos_with_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ablation = subprocess.run([*torchrun, str(HERE / "train_tiny.py"), *QUICK, "--steps", "2", "--curve-every", "1",
                               "--eval-clips", "4", "--ablation", "--out", str(tmp_path / "ablation")],
                              capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert ablation.returncode == 0, ablation.stderr[-3000:]  # the other process has no table to print, and ends
    assert ablation.stdout.count("\nflatten ") == 1 and "Traceback" not in ablation.stderr
    rows = (tmp_path / "ablation" / "none" / "metrics.jsonl").read_text()
    assert rows.count('"kind": "curve"') == 1 and rows.count('"step": 2') == 1  # rank 0 alone wrote them
    tv.main(["--samples", "8", "--out", str(tmp_path / "world")])
    videos = subprocess.run([*torchrun, str(HERE / "examples" / "train_videos.py"), *QUICK, "--steps", "2",
                             "--data", str(tmp_path / "world" / "captions.csv"), "--val-share", "0.3", "--workers", "1",
                             "--out", str(tmp_path / "videos")], capture_output=True, text=True, timeout=240, env=env,
                            cwd=tmp_path)
    assert videos.returncode == 0, videos.stderr[-3000:]
    assert "2 process(es)" in videos.stdout and videos.stdout.count("eval step 2") == 1
    assert ckpt_of(tmp_path / "videos")["step"] == 2
    tv.main(["--samples", "72", "--out", str(tmp_path / "world72")])  # 3 shards: 2 processes x 1 worker read 2 of them
    shards = subprocess.run([*torchrun, str(HERE / "examples" / "train_videos.py"), *QUICK, "--steps", "2", "--data",
                             str(tmp_path / "world72" / "shards" / "{00000..00001}.tar"), "--val-data",
                             str(tmp_path / "world72" / "shards" / "00002.tar"), "--workers", "1", "--out",
                             str(tmp_path / "shards")], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert shards.returncode == 0 and "2 process(es)" in shards.stdout, shards.stderr[-3000:]
    assert shards.stdout.count("eval step 2") == 1 and ckpt_of(tmp_path / "shards")["step"] == 2


# --- real clips: frames, as ours and as an official checkpoint saw them ----------------------------------------------


@pytest.mark.parametrize("codec, ext", [("libx264", "mp4"), ("mpeg4", "mp4"), ("libx264", "mkv"), ("libx264", "ts"),
                                        ("mpeg4", "avi")])
def test_eval_sampling_takes_the_segment_middles(tmp_path, codec, ext):
    path = make_video(tmp_path / f"v.{ext}", codec=codec)
    for t in (1, 3, 8):
        assert indices(tv.load_clip(path, t, 32)) == middles(60, t)
    # seconds: at 30 fps the frames 15..44 lie in [0.49, 1.49)
    assert indices(tv.load_clip(path, 4, 32, start=0.49, end=1.49)) == [15 + m for m in middles(30, 4)]


def test_variable_frame_rate(tmp_path):
    times = np.concatenate([[0], np.cumsum(np.random.default_rng(0).uniform(0.01, 0.2, 59))])
    path = make_video(tmp_path / "vfr.mp4", times=times)
    assert indices(tv.load_clip(path, 5, 32)) == middles(60, 5)
    for start, end in [(0.5, 2.5), (1.234, 4.0), (3.0, 100.0)]:
        inside = np.flatnonzero((times >= start) & (times < end))
        want = [int(inside[m]) for m in middles(len(inside), 6)]
        got = indices(tv.load_clip(path, 6, 32, start=start, end=end))
        assert all(abs(a - b) <= 1 for a, b in zip(got, want)) and len(got) == 6, (got, want)


def test_training_sampling_stays_inside_each_segment(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=40, w=64, h=64)
    seen = set()
    for seed in range(4):
        got = indices(tv.load_clip(path, 5, 32, train=True, generator=torch.Generator().manual_seed(seed)))
        assert all(8 * k <= g <= 8 * k + 7 for k, g in enumerate(got)), got
        seen.add(tuple(got))
    assert len(seen) > 1  # random, not always the middles
    a, b = (tv.load_clip(path, 5, 32, train=True, generator=torch.Generator().manual_seed(7)) for _ in "ab")
    assert torch.equal(a, b)


def test_short_clip_repeats_frames_in_order(tmp_path):
    path = make_video(tmp_path / "short.mp4", n=3, w=48, h=48)
    assert indices(tv.load_clip(path, 8, 32)) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert indices(tv.load_clip(path, 8, 32, train=True)) == [0, 0, 0, 1, 1, 1, 2, 2]
    for seed in range(5):
        got = tv.segment_frames(3, 7, train=True, generator=torch.Generator().manual_seed(seed))
        assert got == sorted(got) and set(got) == {0, 1, 2}


@pytest.mark.parametrize("matrix, turns", [(PORTRAIT, 1), ([0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30], -1),
                                           ([-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30], 2)])
def test_rotation_metadata_is_honoured(tmp_path, matrix, turns):
    path = make_video(tmp_path / "rot.mp4", n=20, w=96, h=64, matrix=matrix)
    with av.open(str(path)) as c:  # the file really carries the rotation
        assert (next(c.decode(video=0)).rotation + 90 * turns) % 360 == 0
    clip = tv.load_clip(path, 4, 32)
    # turning the output back by the metadata's angle gives the drawn picture, upright
    assert [read_index(torch.from_numpy(np.rot90(f.numpy(), turns, (1, 2)).copy())) for f in clip] == middles(20, 4)
    assert indices(clip) != middles(20, 4)


@pytest.mark.parametrize("w, h", [(96, 64), (64, 96)])
def test_shape_range_and_centre_crop(tmp_path, w, h):
    clip = tv.load_clip(make_video(tmp_path / "wide.mp4", n=10, w=w, h=h), 3, 40)
    assert clip.shape == (3, 3, 40, 40) and clip.dtype == torch.float32
    assert -1 <= clip.min() < -0.9 and 0.9 < clip.max() <= 1
    assert indices(clip) == middles(10, 3)
    assert clip[:, :, 2:-2, [0, 1, -2, -1]].abs().mean() > 0.8  # the grey margins were cropped away


def test_every_kind_of_bad_file_raises_clip_error_naming_it(tmp_path):
    reasons = ["No such file", "Invalid data", "Invalid data", "Invalid data", r"truncated \(1 of 30 frames\)",
               "no video stream"]
    for name, reason in zip(make_bad_files(tmp_path), reasons):
        with pytest.raises(tv.ClipError, match=f"cannot load .*{name}: {reason}"):
            tv.load_clip(tmp_path / name, 4, 32)
    with pytest.raises(tv.ClipError, match=r"good.mp4.*no video frames in \[5.0, 6.0\)"):
        tv.load_clip(tmp_path / "good.mp4", 4, 32, start=5.0, end=6.0)


def test_resize_like_pillow_matches_pillow():
    """testdata/pillow_bilinear.pt holds Pillow 8.2's (the official code's) BILINEAR resizes of a few images."""
    ref = torch.load(HERE / "testdata" / "pillow_bilinear.pt", weights_only=True)
    y, x = np.mgrid[0:512, 0:512]
    smooth = np.stack([(127 + 120 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c)) for c in range(3)], -1).astype(np.uint8)
    for key, size in [("64to20", 20), ("64to38", 38), ("64to76", 76), ("512to268", 268)]:
        image = ref[key + "_input"].numpy() if key + "_input" in ref else smooth
        assert np.array_equal(tv.resize_like_pillow(image, size), ref[key].numpy()), key


def blocks(i, w, h):  # four colour blocks, split at a quarter of the width and half the height
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 4], img[: h // 2, w // 4:] = (200, 30, 60), (90, 90, 250)
    img[h // 2:, : w // 4], img[h // 2:, w // 4:] = (10, 220, 90), (250, 250, 20)
    return img


def test_official_preprocessing_squashes_resizes_and_crops(tmp_path):
    path = make_video(tmp_path / "blocks.mkv", n=6, w=96, h=64, codec="libx264rgb", draw=blocks, pix_fmt="rgb24",
                      codec_options={"qp": "0"})  # lossless: the frame's pixels are known
    clip = tv.load_clip(path, 2, 32, preprocess="official")
    # By hand: squashed to 512x512, the split lies at x = 128 and y = 256; resized to int(1.2 * 32) = 38 px, at 9.5
    # and 19; the centre crop starts at round((38 - 32) / 2) = 3, so in the output at x = 6.5 and y = 16: pixel column
    # 6 and rows 15 and 16 are blends (bilinear filters), the others the colour of their block, normalised with
    # ImageNet's mean and std.
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None], torch.tensor([0.229, 0.224, 0.225])[:, None]
    img = blocks(0, 96, 64)
    for ys, xs, colour in [(range(0, 15), range(0, 6), img[0, 0]), (range(0, 15), range(7, 32), img[0, -1]),
                           (range(17, 32), range(0, 6), img[-1, 0]), (range(17, 32), range(7, 32), img[-1, -1])]:
        got = clip[:, :, ys][:, :, :, xs].permute(1, 0, 2, 3).flatten(1)  # (3, pixels)
        want = (torch.tensor(colour, dtype=torch.float)[:, None] / 255 - mean) / std
        assert torch.allclose(got, want.expand_as(got), atol=0.02), colour
    red = clip[0, 0]  # the red channel: strictly between its neighbours at the splits
    assert (red[:15, 5] > red[:15, 6]).all() and (red[:15, 6] > red[:15, 7]).all()
    assert (red[14, 0] > red[15, 0] > red[16, 0] > red[17, 0]) or (red[14, 0] < red[15, 0] < red[16, 0] < red[17, 0])
    # ours keeps the aspect ratio: the shorter side to 32 (width 48), centre crop from 8: the split at x = 12 - 8 = 4
    ours = tv.load_clip(path, 2, 32)
    assert torch.allclose(ours[0, 0, :14, 5], ours[0, 0, :14, 31], atol=0.02)
    assert not torch.allclose(clip[0, 0, :14, 5], clip[0, 0, :14, 31], atol=0.1)


@pytest.mark.parametrize("codec, ext, pix_fmt", [("mjpeg", "jpg", "yuvj420p"), ("png", "png", "rgb24")])
def test_an_image_is_a_clip_of_one_repeated_frame(tmp_path, codec, ext, pix_fmt):
    path = tmp_path / f"still.{ext}"
    with av.open(str(path), "w", format="image2") as out:
        s = out.add_stream(codec)
        s.width, s.height, s.pix_fmt = 64, 48, pix_fmt
        out.mux(s.encode(av.VideoFrame.from_ndarray(draw_index(37, 64, 48), format="rgb24").reformat(format=pix_fmt)))
        out.mux(s.encode())
    clip = tv.load_clip(path, 3, 32)
    assert clip.shape == (3, 3, 32, 32) and indices(clip) == [37, 37, 37]
    assert tv.load_clip(path, 3, 32, preprocess="official").shape == (3, 3, 32, 32)


# --- your own videos: data files, training through bad files, evaluation by clip, fine-tuning ------------------------


def test_data_file_errors_name_the_line(tmp_path):
    (tmp_path / "ok.csv").write_text('video,caption,start,end\na.mp4,"a cat, sitting",,\nb.mp4,a dog,1.5,3\n')
    kind, rows = tv.read_rows(tmp_path / "ok.csv")
    assert kind == "captions" and rows[0] == dict(video=str(tmp_path / "a.mp4"), caption="a cat, sitting", start=None, end=None)
    assert rows[1]["start"] == 1.5 and rows[1]["end"] == 3.0
    assert tv.read_rows(tmp_path / "ok.csv", video_root="/videos")[1][0]["video"] == "/videos/a.mp4"
    (tmp_path / "bom.csv").write_bytes("\ufeffvideo,caption\na.mp4,un café\n".encode("utf-8"))
    assert tv.read_rows(tmp_path / "bom.csv")[1][0]["caption"] == "un café"  # a byte-order mark is fine
    (tmp_path / "upper.JSONL").write_text('{"video": "a.mp4", "caption": "x"}\n')
    assert tv.read_rows(tmp_path / "upper.JSONL")[1][0]["caption"] == "x"
    kind, rows = tv.read_rows(write(tmp_path / "mc.csv", 'video,options,answer\na.mp4,"[""a cat"", ""a dog""]",1\n'))
    assert kind == "mc" and rows[0]["options"] == ["a cat", "a dog"] and rows[0]["answer"] == 1
    kind, rows = tv.read_rows(write(tmp_path / "qa.jsonl", '{"video": "a.mp4", "question": "what is it?", "answer": "cat"}\n'))
    assert kind == "qa" and rows[0]["answer"] == "cat" and rows[0]["type"] == ""
    bad = {
        "nocaption.csv": ("video,caption\na.mp4,a cat\nb.mp4,\n", "nocaption.csv line 3: empty caption"),
        "novideo.jsonl": ('{"video": "a.mp4", "caption": "x"}\n{"caption": "y"}\n', "novideo.jsonl line 2: no 'video'"),
        "notjson.jsonl": ('{"video": "a.mp4", "caption": "x"}\n\n{oops\n', "notjson.jsonl line 3: not JSON"),
        "times.csv": ("video,caption,start,end\na.mp4,x,4,2\n", "times.csv line 2: start 4.0 is not before end 2.0"),
        "seconds.csv": ("video,caption,start\na.mp4,x,soon\n", "seconds.csv line 2: start and end must be seconds"),
        "outside.jsonl": ('{"video": "a", "options": ["x", "y"], "answer": 0}\n{"video": "b", "options": ["x", "y"], "answer": 2}\n',
                          r"outside.jsonl line 2: answer 2 is outside its 2 options"),
        "notalist.csv": ('video,options,answer\na.mp4,a cat,0\n', "notalist.csv line 2: options must be a JSON list"),
        "noindex.jsonl": ('{"video": "a", "options": ["x", "y"], "answer": "x"}\n', "noindex.jsonl line 1: answer must be the index"),
        "noanswer.csv": ("video,question,answer\na.mp4,what?,cat\nb.mp4,who?,\n", "noanswer.csv line 3: empty answer"),
        "noquestion.jsonl": ('{"video": "a", "question": "what?", "answer": "x"}\n{"video": "a", "question": "", "answer": "x"}\n',
                             "noquestion.jsonl line 2: empty question"),
        "empty.csv": ("video,caption\n", "empty.csv: no rows"),
    }
    for name, (content, message) in bad.items():
        with pytest.raises(tt.BadInput, match=message):
            tv.read_rows(write(tmp_path / name, content))
    (tmp_path / "latin1.csv").write_bytes("video,caption\na.mp4,ok\nb.mp4,un caf\xe9\n".encode("latin-1"))
    with pytest.raises(tt.BadInput, match=r"latin1.csv line 3: not UTF-8 \(byte 0xe9\)"):
        tv.read_rows(tmp_path / "latin1.csv")


def test_rows_are_columns_and_the_held_out_videos_follow_the_seeded_rule(tmp_path):
    import gc
    lines = [f"v{i % 4000}.mp4,caption number {i} of the file,{i % 7},{i % 7 + 2.5}" for i in range(20_000)]
    write(tmp_path / "big.csv", "video,caption,start,end\n" + "\n".join(lines) + "\n")
    gc.collect()
    objects = len(gc.get_objects())
    kind, rows = tv.read_rows(tmp_path / "big.csv")
    gc.collect()
    assert len(gc.get_objects()) - objects < 200  # no Python object a row
    text_bytes = sum(len(line) for line in lines)
    held = sum(a.nbytes for a in (rows.times, rows.index, *(c.data for c in rows.texts.values()),
                                  *(c.ends for c in rows.texts.values())))
    assert held < text_bytes + 48 * len(lines) and len(rows) == 20_000
    assert rows[19_999] == dict(video=str(tmp_path / "v3999.mp4"), start=19_999 % 7, end=19_999 % 7 + 2.5,
                                caption="caption number 19999 of the file")
    # without --val-data, the held-out videos: the sorted paths in a seeded shuffle, the first 5% of them
    data = tv.read_data(tt.parse_options(["--data", str(tmp_path / "big.csv"), "--seed", "3"], tv.VideoOptions))
    videos = sorted(str(tmp_path / f"v{i}.mp4") for i in range(4000))
    __import__("random").Random(3).shuffle(videos)
    assert {r["video"] for r in data["val"]} == set(videos[:200]) and len(data["val"]) == 1000
    assert len(data["train"]) == 19_000 and not {r["video"] for r in data["train"]} & set(videos[:200])


def test_training_on_a_folder_with_bad_files_finishes_and_reports_them(tmp_path, capsys):
    bad = make_bad_files(tmp_path)
    for i in range(8):
        make_video(tmp_path / f"clip{i}.mp4", n=12, w=40, h=32, codec="mpeg4")
    rows = [f"clip{i}.mp4,clip number {i} of the set" for i in range(8)] + [f"{name},a broken clip" for name in bad[:3]]
    (tmp_path / "train.csv").write_text("video,caption\n" + "\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("video,caption\nclip0.mp4,clip number zero\nclip1.mp4,clip number one\n"
                                      "corrupt.mp4,broken\n")
    argv = ["--data", str(tmp_path / "train.csv"), "--val-data", str(tmp_path / "val.csv"), "--preset", "nano",
            "--batch", "4", "--vtm-clips", "4", "--mlm-clips", "2", "--steps", "4", "--log-every", "1",
            "--workers", "1", "--max-bad-share", "0.6", "--out", str(tmp_path / "out"), "--device", "cpu"]
    last = train_videos(argv)
    out = capsys.readouterr().out
    assert out.count("warning: skipped") == len(set(out.split("warning: skipped")[1:]))  # each file once
    assert "corrupt.mp4" in out and last["skipped_clips"] >= 1 and last["step"] == 4
    assert "vtm_acc" in last and "mc_acc" not in last  # no time-word variants for your own captions
    # too many failures stop the run with examples
    (tmp_path / "bad.csv").write_text("video,caption\n" + "\n".join(f"{n},x" for n in bad) + "\nclip0.mp4,ok\n")
    with pytest.raises(tt.BadInput, match="failed to load"):
        train_videos(argv[:1] + [str(tmp_path / "bad.csv")] + argv[2:] + ["--max-bad-share", "0.1", "--restart"])


def test_with_compile_every_batch_of_texts_has_one_length(tmp_path):
    names = make_clips(tmp_path, 4)
    write(tmp_path / "c.csv", "video,caption\n" + "\n".join(f"{v},{' '.join(['word'] * (i + 1))}" for i, v in
                                                           enumerate(names)) + "\n")
    for compile, lengths in ((False, {3, 4, 5, 6}), (True, {16})):  # [CLS] words [SEP]; nano's max_text_len
        opts = tt.parse_options(["--data", str(tmp_path / "c.csv"), "--val-data", str(tmp_path / "c.csv"), "--batch",
                                 "2", "--vtm-clips", "2", "--mlm-clips", "2", "--steps", "4", "--workers", "0"]
                                + ["--compile"] * compile, tv.VideoOptions)
        _, _, data, _ = tt.setup(opts, torch.device("cpu"), tv.Clips)
        seen = {b[k].shape[1] for b in data.batches(0) for k in ("text_ids", "vtm_ids", "mlm_ids")}
        assert seen <= lengths and (len(seen) > 1) != compile, (compile, seen)


def test_every_bad_file_is_named_once_when_nothing_loads(tmp_path, capsys):
    bad = make_bad_files(tmp_path)
    names = make_clips(tmp_path, 1)
    write(tmp_path / "bad.csv", "video,caption\n" + "\n".join(f"{n},x" for n in bad * 4) + "\n")
    write(tmp_path / "val.csv", f"video,caption\n{names[0]},a good clip\n")
    code, _, err = run_cli(["--data", str(tmp_path / "bad.csv"), "--val-data", str(tmp_path / "val.csv"), "--batch", "4",
                            "--vtm-clips", "2", "--mlm-clips", "0", "--workers", "0", "--out", str(tmp_path / "o"),
                            "--device", "cpu"], capsys, main=tv.main)
    assert code == 1 and "failed to load" in err and "6 files in all" in err and "Traceback" not in err
    named = [name for name in bad if name in err]
    assert len(named) == 5 and all(err.count(name) == 1 for name in named)


def test_held_out_clips_with_several_captions_are_evaluated_by_clip(tmp_path, capsys):
    names = make_clips(tmp_path, 6)
    train = [f"{v},clip {i} seen from the left" for i, v in enumerate(names[:4])]
    val = [f"{v},caption {k} of clip {i}" for i, v in enumerate(names[4:]) for k in range(3)]
    write(tmp_path / "train.csv", "video,caption\n" + "\n".join(train) + "\n")
    write(tmp_path / "val.csv", "video,caption\n" + "\n".join(val) + "\n")
    flags = ["--data", str(tmp_path / "train.csv"), "--batch", "4", "--vtm-clips", "4", "--mlm-clips", "2", "--steps", "2",
             "--log-every", "1", "--workers", "0", "--device", "cpu"]
    last = train_videos(flags + ["--val-data", str(tmp_path / "val.csv"), "--out", str(tmp_path / "a")])
    assert last["clips"] == 2 and last["captions"] == 6 and "vtm_acc" in last
    # the same ranks by hand, from the checkpoint: caption i belongs to clip i // 3 (of 2), a clip to its 3 captions
    model, text = model_of(tmp_path / "a")
    clips = torch.stack([tv.load_clip(tmp_path / v, model.cfg.frames, model.cfg.image_size) for v in names[4:]])
    with torch.no_grad():
        sim = cosine_similarity(model.text_proj(model.encode_text(*text([r.split(",")[1] for r in val])).text[:, 0]),
                                model.video_proj(model.encode_video(clips).video[:, 0]))
    hits = torch.arange(6)[:, None] // 3 == torch.arange(2)[None]
    for direction, ranks in (("t2v", first_hit_ranks(sim, hits)), ("v2t", first_hit_ranks(sim.T, hits.T))):
        assert {k: last[k] for k in recall_metrics(ranks, direction)} == recall_metrics(ranks, direction)
    # one held-out clip: evaluated, with what needs two left out and said so; the step's checkpoint is on disk
    write(tmp_path / "one.csv", "video,caption\n" + "\n".join(val[:3]) + "\n")
    last = train_videos(flags + ["--val-data", str(tmp_path / "one.csv"), "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert last["clips"] == 1 and "vtm_acc" not in last and "t2v_r1" not in last and "retrieval left out" in out
    assert ckpt_of(tmp_path / "b")["step"] == 2
    # zero-shot multiple choice with the model just trained, from a file of options
    mc = [json.dumps(dict(video=v, options=[f"clip {i} seen from the left", "a cat", "a dog"], answer=0))
          for i, v in enumerate(names[:3])]
    write(tmp_path / "mc.jsonl", "\n".join(mc) + "\n")
    code, out, err = run_cli(["--eval-only", "--init", str(tmp_path / "a" / "ckpt.pt"), "--val-data",
                              str(tmp_path / "mc.jsonl"), "--out", str(tmp_path / "mc"), "--workers", "0",
                              "--order-test"], capsys, main=tv.main)
    assert code == 0, err
    row = json.loads((tmp_path / "mc" / "metrics.jsonl").read_text())
    assert {"mc_acc_reversed", "mc_acc_shuffled"} <= row.keys() and "t2v_r1_reversed" not in row  # no captions here
    with torch.no_grad():  # by hand: each clip with its 3 options, scored by the VTM match logit; the answer is 0
        clips = torch.stack([tv.load_clip(tmp_path / v, model.cfg.frames, model.cfg.image_size) for v in names[:3]])
        ids, mask = text([o for line in mc for o in json.loads(line)["options"]])
        scores = model.score_options(clips, ids.view(3, 3, -1), mask.view(3, 3, -1))
    assert row["clips"] == 3 and row["mc_acc"] == strictly_best(scores, torch.zeros(3, dtype=torch.long)).float().mean().item()
    assert "mc_acc" in out


def test_fine_tuning_on_your_files_multiple_choice_and_qa(tmp_path, capsys):
    names = make_clips(tmp_path, 5)
    write(tmp_path / "cap.csv", "video,caption\n" + "\n".join(f"{v},clip {i}" for i, v in enumerate(names)) + "\n")
    flags = ["--batch", "4", "--vtm-clips", "2", "--mlm-clips", "0", "--steps", "2", "--log-every", "1", "--workers", "0",
             "--device", "cpu", "--eval-every", "2"]
    # --task qa on a file of captions: said plainly
    code, _, err = run_cli(flags + ["--task", "qa", "--data", str(tmp_path / "cap.csv"), "--out", str(tmp_path / "x")], capsys, main=tv.main)
    assert code == 1 and "has caption rows; --task qa trains on rows with question and answer" in err
    qa = [f"{v},what is shown?,{'cat' if i % 2 else 'dog'},{'what'}" for i, v in enumerate(names[:4])]
    write(tmp_path / "qa.csv", "video,question,answer,type\n" + "\n".join(qa) + "\n")
    write(tmp_path / "qa_val.csv", f"video,question,answer,type\n{names[4]},what is shown?,bird,what\n{names[0]},what is it?,dog,what\n")
    code, out, err = run_cli(flags + ["--task", "qa", "--data", str(tmp_path / "qa.csv"), "--val-data", str(tmp_path / "qa_val.csv"),
                                      "--out", str(tmp_path / "qa")], capsys, main=tv.main)
    assert code == 0, err
    ckpt = ckpt_of(tmp_path / "qa")
    assert ckpt["answers"] == ["cat", "dog"]  # as often each: in alphabetical order
    row = json.loads((tmp_path / "qa" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["qa_unknown_answers"] == 0.5 and row["qa_acc"] <= 0.5 and "qa_acc_what" in row
    # evaluating the fine-tuned checkpoint: task and answers come from it
    code, out, err = run_cli(["--eval-only", "--init", str(tmp_path / "qa" / "ckpt.pt"), "--task", "qa", "--val-data",
                              str(tmp_path / "qa_val.csv"), "--out", str(tmp_path / "qa_eval"), "--workers", "0"], capsys, main=tv.main)
    assert code == 0 and json.loads((tmp_path / "qa_eval" / "metrics.jsonl").read_text())["qa_acc"] == row["qa_acc"]
    mc = [json.dumps(dict(video=v, options=[f"clip {i}", f"clip {(i + 1) % 5}"], answer=i % 2)) for i, v in enumerate(names)]
    write(tmp_path / "mc.jsonl", "\n".join(mc) + "\n")
    code, out, err = run_cli(flags + ["--task", "mc", "--data", str(tmp_path / "mc.jsonl"), "--val-share", "0.4",
                                      "--out", str(tmp_path / "mc")], capsys, main=tv.main)
    assert code == 0, err
    assert "mc_acc" in json.loads((tmp_path / "mc" / "metrics.jsonl").read_text()) and ckpt_of(tmp_path / "mc")["config"]["mc_head"]


# --- WebDataset shards -----------------------------------------------------------------------------------------------


def test_shards_the_world_writes_train_and_evaluate_as_its_files(tmp_path, capsys, one_thread):
    tv.main(["--samples", "40", "--out", str(tmp_path / "world")])
    shards = sorted(p.name for p in (tmp_path / "world" / "shards").iterdir())
    assert shards == ["00000.tar", "00001.tar"]  # 32 samples a shard
    with tv.tarfile.open(tmp_path / "world" / "shards" / "00001.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000010007.json").read())
    assert names[:3] == ["000010000.mp4", "000010000.txt", "000010000.json"] and len(names) == 3 * 8
    assert meta == dict(url=str(tmp_path / "world" / "clips" / "clip00039.mp4"), caption=tt.caption_text(39),
                        key="000010007", status="success")
    flags = ["--batch", "4", "--vtm-clips", "2", "--mlm-clips", "2", "--log-every", "1", "--device", "cpu"]
    code, out, err = run_cli(flags + ["--data", str(tmp_path / "world" / "shards" / "00000.tar"), "--val-data",
                                      str(tmp_path / "world" / "shards" / "{00001..00001}.tar"), "--steps", "3",
                                      "--workers", "1", "--out", str(tmp_path / "run")], capsys, main=tv.main)
    assert code == 0 and "eval step 3" in out and "clips 8 captions 8" in out, err
    # the same checkpoint on the same clips, through the shards and through the files: the same metrics
    rows = []
    for name, val in (("shards", str(tmp_path / "world" / "shards")), ("files", str(tmp_path / "world" / "captions.csv"))):
        code, _, err = run_cli(["--eval-only", "--init", str(tmp_path / "run" / "ckpt.pt"), "--val-data", val,
                                "--workers", "0", "--out", str(tmp_path / name)], capsys, main=tv.main)
        assert code == 0, err
        rows.append({k: v for k, v in json.loads((tmp_path / name / "metrics.jsonl").read_text()).items()
                     if k != "checkpoint"})
    assert rows[0] == rows[1] and rows[0]["clips"] == 40 and "t2v_r1" in rows[0]


def video2dataset_shard(path, clips, captions, how):
    """A shard as video2dataset writes it, with plain tarfile: per key .mp4, .txt and .json; how[i] leaves out
    what sample i lacks ("txt": its caption only in the .json; "mp4": no video)."""
    with tv.tarfile.open(path, "w") as tar:
        for i, (clip, caption) in enumerate(zip(clips, captions)):
            key = f"{path.stem}{i:04d}"
            files = {"mp4": clip.read_bytes(), "txt": caption.encode(),
                     "json": json.dumps(dict(url=f"http://x/{i}", caption=caption, key=key, status="success")).encode()}
            for ext, data in files.items():
                if ext != how.get(i):
                    info = tv.tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_video2dataset_shards_json_captions_missing_videos_and_a_truncated_shard(tmp_path, capsys):
    clips = [tmp_path / name for name in make_clips(tmp_path, 6)]
    captions = [f"clip {i} of the set" for i in range(6)]
    video2dataset_shard(tmp_path / "00000.tar", clips, captions, {1: "txt", 4: "mp4"})
    whole = video2dataset_shard(tmp_path / "00001.tar", clips[::-1], captions[::-1], {}).read_bytes()
    (tmp_path / "00002.tar").write_bytes(whole[: len(whole) // 2])  # cut off in the middle of a sample
    video2dataset_shard(tmp_path / "val.tar", clips[:3], captions[:3], {0: "txt"})
    failures = []
    samples = list(tv.shard_samples(str(tmp_path / "00000.tar"), failures))
    assert [k for k, _ in samples] == [f"00000{i:04d}" for i in range(6)] and not failures
    found = [tv.sample_of("s", k, files) for k, files in samples]
    assert found[1][2] == "clip 1 of the set" and found[4] == "s sample 000000004: no video"  # caption from the .json
    assert len(list(tv.shard_samples(str(tmp_path / "00002.tar"), failures))) < 6 and "ends early" in failures[0][1]
    code, out, err = run_cli(["--data", str(tmp_path / "{00000..00002}.tar"), "--val-data", str(tmp_path / "val.tar"),
                              "--batch", "4", "--vtm-clips", "2", "--mlm-clips", "2", "--steps", "4", "--log-every", "1",
                              "--workers", "1", "--max-bad-share", "0.5", "--device", "cpu", "--out",
                              str(tmp_path / "run")], capsys, main=tv.main)
    assert code == 0 and "eval step 4" in out and "clips 3 captions 3" in out, err
    assert "no video" in out and "ends early" in out and "skipped" in out.splitlines()[-3]
    # a cut shard is named whatever the shuffle buffer; a few bad samples among many good ones stop nothing
    stream = tv.ShardStream([str(tmp_path / "00002.tar")], Config.preset("nano"), "ours", 0, 0, 0, 1, buffer=1)
    assert any("ends early" in f for (*_, failures), _ in zip(stream, range(6)) for _, f in failures)
    video2dataset_shard(tmp_path / "many.tar", clips[:1] * 220, [""] * 20 + ["a clip"] * 200, {})
    opts = tt.parse_options(["--data", str(tmp_path / "many.tar"), "--val-data", str(tmp_path / "many.tar"),
                             "--workers", "1", "--eval-clips", "200"], tv.VideoOptions)
    shards = tv.Shards(opts)
    assert sum(1 for _ in shards.texts()) == 400 and shards.skipped.count == 0  # vocabulary: the captions alone
    shards.cfg, shards.preprocess, shards.tokens = Config.preset("nano"), "ours", tt.Tokens(tt.make_tokenizer("", ["a clip"]), 8)
    assert len(shards.held_out().video) == 200 and (shards.skipped.count, shards.skipped.total) == (20, 220)
    # bad input: one line each
    for argv, message in [(["--data", str(tmp_path / "{00000..00009}.tar")], "no such shard"),
                          (["--data", str(tmp_path / "00000.tar"), "--workers", "2"], "1 shard(s) for 1 process(es) x 2"),
                          (["--data", str(tmp_path / "00000.tar"), "--task", "qa"], "shards hold captions: --task pretrain"),
                          (["--data", str(tmp_path / "00000.tar"), "--val-data", str(clips[0])], "shards hold captions")]:
        argv += [] if "--val-data" in argv else ["--val-data", str(tmp_path / "val.tar")]
        code, _, err = run_cli(argv + ["--out", str(tmp_path / "bad")], capsys, main=tv.main)
        assert code == 1 and message in err and "Traceback" not in err, (argv, err)


def test_shard_readers_take_disjoint_shares_and_a_new_order_each_pass(tmp_path):
    tv.main(["--samples", "96", "--out", str(tmp_path)])  # 3 shards of 32
    shards = tv.shard_list(str(tmp_path / "shards"), "--data")
    cfg = Config.preset("nano")

    def names(rank, world, n, start=0):  # shard:key of the first n samples process rank reads
        stream = tv.ShardStream(shards, cfg, "ours", 0, start, rank, world, buffer=8)
        return [names[0] for (_, _, names, _), _ in zip(stream, range(n))]

    one = names(0, 1, 192)
    everything = sorted(f"{shard}:{k // 32:05d}{k % 32:04d}" for shard, k in zip(sorted(shards * 32), range(96)))
    assert sorted(one[:96]) == sorted(one[96:]) == everything and one[:96] != one[96:]  # each pass all once, reordered
    first, second = names(0, 2, 64), names(1, 2, 32)  # 3 shards: process 0 reads 2 of them a pass, process 1 one
    assert not set(first) & set(second) and sorted(first + second) == everything
    assert names(0, 1, 20) == one[:20] and names(0, 1, 20, start=5) != one[:20]  # seeded; a resumed run: a new pass


# =====================================================================================================================
# examples/


def test_recorded_attention_is_the_models_own(one_thread):
    rolling = example("show_rolling")
    for temporal in ("roll", "flatten"):
        model = small_model(temporal=temporal).eval()
        video, ids, mask = small_batch()
        inputs, outputs = [], []  # what each Attention takes, and what its SDPA call gave (the projection's input)
        hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in model.blocks]
        hooks += [b.attn.proj.register_forward_pre_hook(lambda m, args: outputs.append(args[0])) for b in model.blocks]
        with torch.no_grad(), rolling.recorded_attention(model) as weights:
            model(video, ids, mask)
        for h in hooks:
            h.remove()
        assert len(weights) == len(outputs) == model.cfg.depth
        for block, x, w, out in zip(model.blocks, inputs, weights, outputs):
            v = rearrange(block.attn.qkv(x), "b s (k h e) -> k b h s e", k=3, h=model.cfg.heads)[2]
            assert_close(rearrange(w @ v, "b h s e -> b s (h e)"), out, f"{temporal}: weights @ v")
            padded = ~mask.bool().repeat_interleave(len(w) // len(mask), 0)  # (sequences, l): padding as keys
            assert torch.allclose(w.sum(-1), torch.ones(())) and (w[..., :ids.shape[1]].permute(0, 3, 1, 2)[padded] == 0).all()


def test_show_rolling_draws_our_checkpoints_and_an_official_one_on_a_video(tmp_path, monkeypatch, official, capsys):
    rolling = example("show_rolling")
    for temporal in ("roll", "none"):
        tt.train(tt.parse_options(QUICK + ["--steps", "1", "--temporal", temporal, "--out", str(tmp_path / temporal)]))
    capsys.readouterr()
    rolling.main([str(tmp_path / "roll" / "ckpt.pt"), str(tmp_path / "none" / "ckpt.pt"), "--out", str(tmp_path / "pic")])
    out = capsys.readouterr().out
    with av.open(str(tmp_path / "pic" / "rolling.png")) as c:
        frame = next(c.decode(video=0))
    assert frame.width > 2 * 4 * (4 * 128) and frame.height > 12 * 128  # 2 columns of 4 blocks; 6 clips x 2 words
    assert out.count("block 0: 25% of the patch slots hold travelled tokens") == 1  # roll: 2 + 2 of 16 each way
    assert out.count("block 0: 0% of the patch slots") == 1  # none: nothing travels
    roll_block0 = next(line for line in out.splitlines() if "block 0: 25%" in line)
    on_travelled, on_filled = roll_block0.split("on them: ")[1].split("; on the slots rolling fills (25%): ")
    assert on_travelled == on_filled  # at block 0 the slots rolling fills hold exactly the tokens that travelled
    none_rows = out.split("none/ckpt.pt")[1].split("block 1")[0].split("(rows i): ")[1].split(" | ")
    assert [[float(v) for v in r.split()] for r in none_rows] == [[float(i == j) for j in range(4)] for i in range(4)]
    ckpt, vocab = official_files(tmp_path, monkeypatch, official, ["a red ball rolls"])
    make_video(tmp_path / "v.mp4", n=20, w=80, h=60)
    code = script(rolling.main, [str(ckpt), "--vocab", str(vocab), "--video", str(tmp_path / "v.mp4"), "--caption",
                                        "a red ball rolls", "--word", "rolls", "--out", str(tmp_path / "o"), "--block", "1"])
    out = capsys.readouterr().out
    assert code is None and "block 1:" in out and "block 0:" not in out and (tmp_path / "o" / "rolling.png").exists()
    with pytest.raises(SystemExit, match="--word 'skates' is not in the caption"):
        script(rolling.main, [str(ckpt), "--vocab", str(vocab), "--video", str(tmp_path / "v.mp4"), "--caption",
                                     "a red ball rolls", "--word", "skates", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no such checkpoint"):
        script(rolling.main, [str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "o")])


def test_plot_curves_draws_each_run_in_each_panel_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    plot = example("plot_curves")
    tt.train(tt.parse_options(QUICK + ["--steps", "2", "--curve-every", "1", "--temporal", "none", "--out",
                                       str(tmp_path / "none")]))
    row = dict(task="pretrain", temporal="roll", mc_acc=0.9)  # a longer run, by hand: curve rows, a full evaluation
    other = write(tmp_path / "metrics.jsonl", "".join(json.dumps(dict(kind="curve", step=s, clips=8, **row, order_flip=s / 4,
                                                                      vtm_acc_temporal=1 - s / 4)) + "\n" for s in (1, 2, 3))
                  + json.dumps(dict(step=4, clips=16, **row, order_flip=1.0, vtm_acc_temporal=0.7)) + "\n")
    capsys.readouterr()
    script(plot.main, [str(tmp_path / "none"), str(other)])
    out = capsys.readouterr().out
    assert "none: 2 points up to step 2" in out and f"{tmp_path.name} roll: 4 points up to step 4" in out
    with av.open(str(tmp_path / "none" / "curves.png")) as c:  # beside the first run
        img = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert img.shape == (plot.TOP + plot.H + plot.BOTTOM + 2 * plot.LEGEND + 8, 3 * (plot.LEFT + plot.W + plot.RIGHT), 3)
    for panel in np.split(img[: plot.TOP + plot.H], 3, axis=1):
        assert all((panel == colour).all(-1).sum() > 20 for colour in plot.COLOURS[:2])  # each run's line
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: no metrics.jsonl"):
        script(plot.main, [str(tmp_path / "empty")])
    write(tmp_path / "empty" / "metrics.jsonl", json.dumps(dict(step=3, task="qa", qa_acc=0.5)) + "\n")
    with pytest.raises(SystemExit, match="no rows with vtm_acc_temporal, mc_acc, order_flip"):
        script(plot.main, [str(tmp_path / "none"), str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_score_video_with_our_checkpoint_and_an_official_one(tmp_path, monkeypatch, official, capsys):
    score = example("score_video")
    tt.train(tt.parse_options(QUICK + ["--steps", "1", "--out", str(tmp_path / "run")]))
    video = make_video(tmp_path / "video.mp4", n=20, w=80, h=60)
    captions = ["a red circle moves left", "a blue square appears", "a green triangle moves up"]
    model, text, preprocess, _ = tv.load_model(tmp_path / "run" / "ckpt.pt")
    expected = score.scores(model, text, preprocess, video, captions)  # by the function, checked by hand below
    clip = tv.load_clip(video, model.cfg.frames, 32)
    ids, mask = text(captions)
    with torch.no_grad():
        by_hand = model.match_score(model(torch.stack([clip] * 3), ids, mask).pooled)
    assert torch.allclose(expected, by_hand, atol=1e-6)
    capsys.readouterr()
    script(score.main, [str(video), *captions, "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(None, 1)[1] for line in lines] == [captions[i] for i in expected.argsort(descending=True)]
    assert [float(line.split()[0]) for line in lines] == [round(v, 2) for v in sorted(expected.tolist(), reverse=True)]
    ckpt, vocab = official_files(tmp_path, monkeypatch, official, ["a man plays the guitar", "a dog runs on a beach"])
    script(score.main, [str(video), "a man plays the guitar", "a dog runs on a beach", "--ckpt", str(ckpt),
                               "--vocab", str(vocab)])
    assert len(capsys.readouterr().out.splitlines()) == 2
    for argv, message in [([str(tmp_path / "missing.mp4"), "x", "--ckpt", str(ckpt), "--vocab", str(vocab)],
                           "missing.mp4: No such file"),
                          ([str(video), "x", "--ckpt", str(vocab)], "vocab.txt: not a file written by torch.save"),
                          ([str(video), "x", "--ckpt", str(ckpt)], "needs its BERT vocabulary, --vocab vocab.txt")]:
        with pytest.raises(SystemExit, match=message):
            script(score.main, argv)
    with pytest.raises(SystemExit):  # argparse's one line: --device: invalid choice
        script(score.main, [str(video), "x", "--ckpt", str(ckpt), "--device", "tpu"])
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err


def test_search_videos_caches_embeddings_skips_bad_files_and_falls_back_without_projections(tmp_path, monkeypatch,
                                                                                            official, capsys):
    search = example("search_videos")
    tt.train(tt.parse_options(QUICK + ["--steps", "1", "--out", str(tmp_path / "run")]))
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    names = [make_video(folder / ("sub" if i % 2 else "") / f"v{i}.mp4", n=12, w=40, h=32, codec="mpeg4",
                        draw=lambda j, w, h, i=i: draw_index((i * 977 + j * 131) % 65536, w, h)) for i in range(5)]
    (folder / "broken.mp4").write_bytes(b"not a video")
    ckpt = tmp_path / "run" / "ckpt.pt"
    argv = [str(folder), "a red circle moves left", "a blue square appears", "--ckpt", str(ckpt), "--top", "3"]
    embedded, reranking = [], []  # the files the video-only pass decodes (not the re-rank's joint passes)
    real_load, real_match = search.tv.load_clip, search.match_scores

    def load(path, *args, **kwargs):
        if not reranking:
            embedded.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    def match(*args):
        reranking.append(True)
        try:
            return real_match(*args)
        finally:
            reranking.clear()

    monkeypatch.setattr(search.tv, "load_clip", load)
    monkeypatch.setattr(search, "match_scores", match)
    capsys.readouterr()
    script(search.main, argv)
    out, err = capsys.readouterr()
    assert "6 videos" not in err and "5 videos: 5 embedded now, 0 from the cache; 1 skipped" in err and "broken.mp4" in err
    lines = out.splitlines()
    assert lines[0] == "a red circle moves left:" and len(lines) == 8 and lines[4] == "a blue square appears:"
    # the ranking: contrastive similarity picks the top 3, the match score orders them; by hand for the first query
    model, text, preprocess, _ = tv.load_model(ckpt)
    clips = torch.stack([tv.load_clip(p, model.cfg.frames, 32) for p in names])
    with torch.no_grad():
        sim = cosine_similarity(model.text_proj(model.encode_text(*text(["a red circle moves left"])).text[:, 0]),
                                model.video_proj(model.encode_video(clips).video[:, 0]))[0]
        top = sim.argsort(descending=True)[:3]
        match = model.match_score(model(clips[top], *text(["a red circle moves left"] * 3)).pooled)
    shown = [str(names[i].relative_to(folder)) for i in top[match.argsort(descending=True)]]
    assert [line.split()[1] for line in lines[1:4]] == shown
    # a second search embeds only what changed: one file rewritten, one added; none from another checkpoint
    embedded.clear()
    make_video(names[2], n=12, w=40, h=32, codec="mpeg4")
    make_video(folder / "v9.mp4", n=12, w=40, h=32, codec="mpeg4")
    script(search.main, argv)
    err = capsys.readouterr().err
    assert "6 videos: 2 embedded now, 4 from the cache; 1 skipped" in err
    assert sorted(embedded) == ["broken.mp4", "v2.mp4", "v9.mp4"]  # the changed, the new, and the one that fails
    tt.train(tt.parse_options(QUICK + ["--steps", "1", "--seed", "1", "--out", str(tmp_path / "other")]))
    capsys.readouterr()
    script(search.main, [str(folder), "x", "--ckpt", str(tmp_path / "other" / "ckpt.pt")])
    assert "6 videos: 6 embedded now, 0 from the cache" in capsys.readouterr().err
    # no contrastive projections: the joint pass over every video, said so
    state = {k: v for k, v in official["state_dict"].items() if not k.startswith(("txt_proj", "vid_proj"))}
    bare, vocab = official_files(tmp_path, monkeypatch, dict(official, state_dict=state), ["a red ball"])
    script(search.main, [str(folder), "a red ball", "--ckpt", str(bare), "--vocab", str(vocab), "--top", "2"])
    out, err = capsys.readouterr()
    assert "no trained contrastive projections" in err and "6 passes for each query" in err
    assert [line.split()[2:4] for line in out.splitlines()[1:]] == [["contrastive", "-"]] * 2
    # bad input: one line each
    (tmp_path / "empty").mkdir()
    for argv, message in [([str(tmp_path / "empty"), "x", "--ckpt", str(ckpt)], "empty: no videos in it"),
                          ([str(tmp_path / "nowhere"), "x", "--ckpt", str(ckpt)], "nowhere: no such folder"),
                          ([str(folder), "x", "--ckpt", str(names[0])], "v0.mp4: not a file written by torch.save")]:
        with pytest.raises(SystemExit, match=message):
            script(search.main, argv)
    # a full disk for the cache: a warning, and the search still answers
    monkeypatch.setattr(tt.WhyNot, "write", lambda self, data: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    make_video(folder / "v10.mp4", n=12, w=40, h=32, codec="mpeg4")
    script(search.main, argv[:2] + ["--ckpt", str(ckpt)])
    out, err = capsys.readouterr()
    assert "warning: cannot write" in err and "No space left on device: the embeddings are not kept" in err and out
