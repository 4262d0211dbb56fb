"""Tests for allinone.py and train_tiny.py. Quick, CPU only: python -m pytest -q test_allinone.py"""

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from einops import rearrange

from allinone import (
    CLS_ID, MASK_ID, PAD_ID, SEP_ID, AllInOne, Config, contrastive_loss, mlm_loss, mlm_mask, temporal_roll, vtm_batch,
    vtm_loss,
)

HERE = Path(__file__).parent
FIXTURE = HERE / "testdata" / "official_mini.pt"


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


# --- parity with the official model -----------------------------------------------------------------------------


def assert_close(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= 1e-5, f"{name}: max abs difference {err:.2e}"


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


def test_own_state_dict_round_trip():
    model = small_model()
    copy = AllInOne(model.cfg)
    copy.load_state_dict(model.state_dict())
    video, ids, mask = small_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(video, ids, mask).pooled, copy.eval()(video, ids, mask).pooled)


def test_video_embeddings_start_as_official_except_in_nano():
    official = AllInOne(Config.preset("tiny")).video_embed  # position N(0, 0.02), time embedding zeros
    assert 0.015 < official.pos.std().item() < 0.025 and not official.temporal.any()
    nano = AllInOne(Config.preset("nano")).video_embed  # both N(0, 0.3): the deviation train_tiny.py needs (README)
    assert 0.25 < nano.pos.std().item() < 0.35 and 0.2 < nano.temporal.std().item() < 0.4


# --- temporal rolling ---------------------------------------------------------------------------------------------


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


def test_temporal_modes_shapes():
    video, ids, mask = small_batch()
    for mode in ("roll", "none", "flatten"):
        for video_only_temporal in (False, True):
            model = small_model(temporal=mode, video_only_temporal=video_only_temporal)
            out = model(video, ids, mask)
            n = model.cfg.tokens_per_frame
            assert out.text.shape == (2, 8, 32) and out.video.shape == (2, n, 32) and out.pooled.shape == (2, 32)
            v = model.encode_video(video)
            assert v.video.shape == (2, n, 32) and v.pooled.shape == (2, 32) and v.text is None
            t = model.encode_text(ids, mask)
            assert t.text.shape == (2, 8, 32) and t.video is None


# --- padding, inputs ----------------------------------------------------------------------------------------------


def test_padded_text_ids_do_not_matter():
    model = small_model().eval()
    video, ids, mask = small_batch()
    other = ids.clone()
    other[mask == 0] = torch.randint(4, 50, (int((mask == 0).sum()),))
    assert not torch.equal(other, ids)
    with torch.no_grad():
        assert torch.allclose(model(video, ids, mask).pooled, model(video, other, mask).pooled, atol=1e-6)
        assert torch.allclose(model.encode_text(ids, mask).pooled, model.encode_text(other, mask).pooled, atol=1e-6)


def test_text_only_pass_runs_the_text_once_and_equals_the_repeated_official_way(official, loaded):
    # the official code repeats the text per frame and averages: identical copies, so one pass is the same
    i = official["inputs"]
    with torch.no_grad():
        once = loaded.encode_text(i["text_ids"], i["text_masks"]).text
        x, mask = loaded.embed_text(i["text_ids"], i["text_masks"])
        repeated = loaded.run_frames(x[:, None].expand(-1, 4, -1, -1), mask, l=x.shape[1], roll=False)
    assert torch.allclose(once, repeated, atol=1e-6)


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


# --- losses and training --------------------------------------------------------------------------------------------


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


def test_vtm_batch_labels():
    video = torch.arange(10).float()[:, None, None]  # clip i holds value i
    paired, labels = vtm_batch(video, generator=torch.Generator().manual_seed(0))
    own = paired[:, 0, 0] == torch.arange(10)
    assert labels.sum() == 5 and torch.equal(own, labels.bool())  # matched pairs keep their clip, others do not
    with pytest.raises(ValueError, match="at least 2"):
        vtm_batch(video[:1])


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


# =====================================================================================================================
# train_tiny.py: synthetic data, metrics, checkpoints, options, DDP

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

import train_tiny as tt  # noqa: E402

QUICK = ["--batch", "8", "--vtm-clips", "4", "--mlm-clips", "2", "--eval-clips", "16", "--log-every", "1",
         "--warmup", "2", "--device", "cpu"]


def test_caption_grammar_and_time_variants():
    assert len(tt.CAPTIONS) == 4 * 3 * 6
    i = tt.CAPTIONS.index(("red", "circle", "moves left"))
    variants = tt.time_variants(i)
    assert variants[0] == i and tt.CAPTIONS[variants[1]] == ("red", "circle", "moves right")
    assert len(set(variants)) == 6 and all(tt.CAPTIONS[j][:2] == ("red", "circle") for j in variants)
    looks = [tt.CAPTIONS[j] for j in tt.looks_variants(i)]
    assert len(set(looks)) == 5 and all(c[2] == "moves left" and (c[0] == "red") != (c[1] == "circle") for c in looks)
    tok = tt.make_tokenizer("", [tt.caption_text(i) for i in range(len(tt.CAPTIONS))])
    assert tok.encode("A red circle moves left").tokens == ["[CLS]", "a", "red", "circle", "moves", "left", "[SEP]"]
    assert tok.get_vocab_size() == 5 + 15 and tok.token_to_id("[UNK]") not in tok.encode(tt.caption_text(i)).ids


def test_bert_vocab_tokenizer(tmp_path):
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "ball",
                                                               "roll", "##s", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = tt.make_tokenizer(tmp_path / "vocab.txt", [])
    assert tok.encode("A red ball, rolls").tokens == ["[CLS]", "a", "red", "ball", ",", "roll", "##s", "[SEP]"]
    assert [tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")] == [PAD_ID, CLS_ID, SEP_ID, MASK_ID]
    (tmp_path / "words.txt").write_text("a\nred\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        tt.make_tokenizer(tmp_path / "words.txt", [])


def test_render_moves_the_shape_the_way_the_caption_says():
    g = torch.Generator().manual_seed(0)
    names = [("red", "square", m) for m in tt.MOTIONS]
    video = tt.render([tt.CAPTIONS.index(c) for c in names], 4, 32, g)
    assert video.shape == (6, 4, 3, 32, 32) and video.min() >= -1 and video.max() <= 1
    red = (video[:, :, 0] > 0.4) & (video[:, :, 1] < -0.2)  # (clip, frame, y, x)
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


def test_recall_and_multiple_choice_on_hand_made_matrices():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.5, 0.4, 0.3]])  # 3 queries, 3 items
    labels = torch.tensor([0, 1, 2])
    assert tt.recall_at_k(sim, labels, labels, 1) == pytest.approx(1 / 3)  # only query 0 ranks its item first
    assert tt.recall_at_k(sim, labels, labels, 2) == pytest.approx(1 / 3)  # query 1's item is 3rd, query 2's too
    assert tt.recall_at_k(sim, labels, labels, 3) == 1
    items = torch.tensor([1, 0, 0])  # a hit is any item with the query's label
    assert tt.recall_at_k(sim, torch.tensor([1, 0, 0]), items, 1) == pytest.approx(2 / 3)
    scores = torch.tensor([[3.0, 1, 0, 0], [0, 2, 1, 0], [5, 1, 1, 6]])
    assert tt.multiple_choice_acc(scores, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)


def tiny_setup(**kw):
    opts = tt.Options(**{"batch": 16, "vtm_clips": 8, "mlm_clips": 4, **kw})
    tok = tt.make_tokenizer("", [tt.caption_text(i) for i in range(len(tt.CAPTIONS))])
    cfg = Config.preset("nano", vocab_size=tok.get_vocab_size(), video_only_temporal=True, dropout=0.0)
    text = tt.Text(tok, cfg.max_text_len)
    torch.manual_seed(0)
    return opts, cfg, text, AllInOne(cfg), tt.Synthetic(cfg, text, opts, torch.device("cpu"))


def test_loss_goes_down_on_a_fixed_batch():
    opts, cfg, text, model, data = tiny_setup(mlm_clips=8)
    objective = tt.Objective(model, opts.temperature)
    batch = data.batch(0)
    assert (batch["mlm_labels"] != -100).sum() >= 2  # something to predict
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


def test_synthetic_batches_are_deterministic_and_held_out_is_new():
    opts, cfg, text, model, data = tiny_setup()
    a, b = data.batch(3), data.batch(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(data.batch(4)["video"], a["video"])
    assert a["vtm_labels"].sum() == 4 and len(a["vtm_ids"]) == 8 and len(a["mlm_ids"]) == 4
    held = data.held_out()
    assert held["video"].shape == (opts.eval_clips, 4, 3, 32, 32)
    assert (held["options_ids"][:, 0] == held["ids"]).all()


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

def test_evaluate_reports_every_metric_in_range():
    opts, cfg, text, model, data = tiny_setup(eval_clips=24)
    metrics = tt.evaluate(model, data.held_out(), text, contextlib.nullcontext())
    assert set(metrics) == {"vtm_acc", "vtm_acc_temporal", "mc_acc", "mlm_acc", "t2v_r1", "t2v_r5", "v2t_r1"}
    assert all(0 <= v <= 1 for v in metrics.values())
    assert model.training  # evaluate switches back


def test_save_atomic_keeps_the_previous_checkpoint_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    tt.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(tt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        tt.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_resume_gives_identical_weights(tmp_path):
    straight = tmp_path / "straight"
    tt.train(tt.parse_options(QUICK + ["--steps", "6", "--out", str(straight)]))
    split = tmp_path / "split"
    tt.train(tt.parse_options(QUICK + ["--steps", "3", "--out", str(split)]))
    tt.train(tt.parse_options(QUICK + ["--steps", "6", "--out", str(split), "--resume"]))
    a = torch.load(straight / "ckpt.pt", weights_only=False)
    b = torch.load(split / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["tokenizer"] == b["tokenizer"] and a["config"] == b["config"]
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6
    for key in ("vtm_acc", "vtm_acc_temporal", "mlm_acc", "t2v_r1", "t2v_r5", "v2t_r1", "mc_acc", "clips_per_s", "wall_s"):
        assert key in rows[-1]
    # the checkpoint is self-contained: model, tokenizer, config
    model = AllInOne(Config(**a["config"]))
    model.load_state_dict(a["model"])
    assert tt.Tokenizer.from_str(a["tokenizer"]).encode("a red circle appears").ids[0] == 2  # [CLS]


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--temporal", "shift"], "--temporal must be roll, none or flatten"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch", "ten"], "invalid int value"),
    (["--init", "x.ckpt"], "--init needs --vocab"),
    (["--data", "no/such.csv"], "--data no/such.csv: no such file"),
])
def test_bad_options_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tt.parse_options(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        tt.parse_options(["--help"])
    out = capsys.readouterr().out
    for f in tt.dataclasses.fields(tt.Options):
        assert "--" + f.name.replace("_", "-") in out


def test_samples_png(tmp_path):
    tt.train(tt.parse_options(["--samples", "3", "--out", str(tmp_path)]))
    import av
    with av.open(str(tmp_path / "samples.png")) as c:
        frame = next(c.decode(video=0))
    assert (frame.width, frame.height) == (4 * 4 * 33, 3 * 4 * 32)  # 4 frames and a line after each
    assert len((tmp_path / "samples.txt").read_text().splitlines()) == 3


def test_two_process_gloo_run(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "train_tiny.py"), *QUICK, "--steps", "3", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout and run.stdout.count("eval ") == 1  # rank 0 alone logs and evaluates
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3


# =====================================================================================================================
# Real clips: load_clip with PyAV, data files, a run that survives bad files
# Each test video shows its frame index as a 4x4 grid of black/white cells (bit j = cell j), so a test can read
# which frame load_clip returned.

from fractions import Fraction  # noqa: E402

import av  # noqa: E402

PORTRAIT = [0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30]  # a phone filmed upright: the display matrix turns it 90°


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


def make_video(path, n=60, w=64, h=48, codec="libx264", times=None, matrix=None, gop=10, options=None):
    """n frames at 30 fps, or at `times` (seconds: a variable frame rate)."""
    with av.open(str(path), "w", options=options or {}) as out:
        s = out.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if times is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if matrix is not None:
            s.set_display_matrix(matrix)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(draw_index(i, w, h), format="rgb24")
            if times is not None:
                f.pts, f.time_base = round(times[i] * 1000), Fraction(1, 1000)
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


def middles(n, t):  # the segment middles, written out independently of train_tiny.segment_frames
    return [(k * n // t + max(k * n // t, (k + 1) * n // t - 1)) // 2 for k in range(t)]


@pytest.mark.parametrize("codec, ext", [("libx264", "mp4"), ("mpeg4", "mp4"), ("libx264", "mkv"), ("libx264", "ts"),
                                        ("mpeg4", "avi")])
def test_eval_sampling_takes_the_segment_middles(tmp_path, codec, ext):
    path = make_video(tmp_path / f"v.{ext}", codec=codec)
    for t in (1, 3, 8):
        assert indices(tt.load_clip(path, t, 32)) == middles(60, t)
    # seconds: at 30 fps the frames 15..44 lie in [0.49, 1.49)
    assert indices(tt.load_clip(path, 4, 32, start=0.49, end=1.49)) == [15 + m for m in middles(30, 4)]


def test_variable_frame_rate(tmp_path):
    times = np.concatenate([[0], np.cumsum(np.random.default_rng(0).uniform(0.01, 0.2, 59))])
    path = make_video(tmp_path / "vfr.mp4", times=times)
    assert indices(tt.load_clip(path, 5, 32)) == middles(60, 5)
    for start, end in [(0.5, 2.5), (1.234, 4.0), (3.0, 100.0)]:
        inside = np.flatnonzero((times >= start) & (times < end))
        want = [int(inside[m]) for m in middles(len(inside), 6)]
        got = indices(tt.load_clip(path, 6, 32, start=start, end=end))
        assert all(abs(a - b) <= 1 for a, b in zip(got, want)) and len(got) == 6, (got, want)


def test_training_sampling_stays_inside_each_segment(tmp_path):
    path = make_video(tmp_path / "v.mp4", n=40, w=64, h=64)
    seen = set()
    for seed in range(4):
        got = indices(tt.load_clip(path, 5, 32, train=True, generator=torch.Generator().manual_seed(seed)))
        assert all(8 * k <= g <= 8 * k + 7 for k, g in enumerate(got)), got
        seen.add(tuple(got))
    assert len(seen) > 1  # random, not always the middles
    a, b = (tt.load_clip(path, 5, 32, train=True, generator=torch.Generator().manual_seed(7)) for _ in "ab")
    assert torch.equal(a, b)


def test_short_clip_repeats_frames_in_order(tmp_path):
    path = make_video(tmp_path / "short.mp4", n=3, w=48, h=48)
    assert indices(tt.load_clip(path, 8, 32)) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert indices(tt.load_clip(path, 8, 32, train=True)) == [0, 0, 0, 1, 1, 1, 2, 2]
    for seed in range(5):
        got = tt.segment_frames(3, 7, train=True, generator=torch.Generator().manual_seed(seed))
        assert got == sorted(got) and set(got) == {0, 1, 2}


@pytest.mark.parametrize("matrix, turns", [(PORTRAIT, 1), ([0, -65536, 0, 65536, 0, 0, 0, 0, 1 << 30], -1),
                                           ([-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30], 2)])
def test_rotation_metadata_is_honoured(tmp_path, matrix, turns):
    path = make_video(tmp_path / "rot.mp4", n=20, w=96, h=64, matrix=matrix)
    with av.open(str(path)) as c:  # the file really carries the rotation
        assert (next(c.decode(video=0)).rotation + 90 * turns) % 360 == 0
    clip = tt.load_clip(path, 4, 32)
    # turning the output back by the metadata's angle gives the drawn picture, upright
    assert [read_index(torch.from_numpy(np.rot90(f.numpy(), turns, (1, 2)).copy())) for f in clip] == middles(20, 4)
    assert indices(clip) != middles(20, 4)


@pytest.mark.parametrize("w, h", [(96, 64), (64, 96)])
def test_shape_range_and_centre_crop(tmp_path, w, h):
    clip = tt.load_clip(make_video(tmp_path / "wide.mp4", n=10, w=w, h=h), 3, 40)
    assert clip.shape == (3, 3, 40, 40) and clip.dtype == torch.float32
    assert -1 <= clip.min() < -0.9 and 0.9 < clip.max() <= 1
    assert indices(clip) == middles(10, 3)
    assert clip[:, :, 2:-2, [0, 1, -2, -1]].abs().mean() > 0.8  # the grey margins were cropped away


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


def test_every_kind_of_bad_file_raises_clip_error_naming_it(tmp_path):
    for name in make_bad_files(tmp_path):
        with pytest.raises(tt.ClipError, match=name):
            tt.load_clip(tmp_path / name, 4, 32)
    with pytest.raises(tt.ClipError, match=r"good.mp4.*no video frames in \[5.0, 6.0\)"):
        tt.load_clip(tmp_path / "good.mp4", 4, 32, start=5.0, end=6.0)
    assert issubclass(tt.ClipError, ValueError)


def test_data_file_errors_name_the_line(tmp_path):
    (tmp_path / "ok.csv").write_text('video,caption,start,end\na.mp4,"a cat, sitting",,\nb.mp4,a dog,1.5,3\n')
    rows = tt.read_rows(tmp_path / "ok.csv")
    assert rows[0] == dict(video=str(tmp_path / "a.mp4"), caption="a cat, sitting", start=None, end=None)
    assert rows[1]["start"] == 1.5 and rows[1]["end"] == 3.0
    assert tt.read_rows(tmp_path / "ok.csv", video_root="/videos")[0]["video"] == "/videos/a.mp4"
    bad = {
        "nocaption.csv": ("video,caption\na.mp4,a cat\nb.mp4,\n", "nocaption.csv line 3: empty caption"),
        "novideo.jsonl": ('{"video": "a.mp4", "caption": "x"}\n{"caption": "y"}\n', "novideo.jsonl line 2: no 'video'"),
        "notjson.jsonl": ('{"video": "a.mp4", "caption": "x"}\n\n{oops\n', "notjson.jsonl line 3: not JSON"),
        "times.csv": ("video,caption,start,end\na.mp4,x,4,2\n", "times.csv line 2: start 4.0 is not before end 2.0"),
        "seconds.csv": ("video,caption,start\na.mp4,x,soon\n", "seconds.csv line 2: start and end must be seconds"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=message):
            tt.read_rows(tmp_path / name)


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
    last = tt.train(tt.parse_options(argv))
    out = capsys.readouterr().out
    assert out.count("warning: skipped") == len(set(out.split("warning: skipped")[1:]))  # each file once
    assert "corrupt.mp4" in out and last["skipped_clips"] >= 1 and last["step"] == 4
    assert "vtm_acc" in last and "mc_acc" not in last  # no time-word variants for your own captions
    # too many failures stop the run with examples
    (tmp_path / "bad.csv").write_text("video,caption\n" + "\n".join(f"{n},x" for n in bad) + "\nclip0.mp4,ok\n")
    with pytest.raises(RuntimeError, match="failed to load"):
        tt.train(tt.parse_options(argv[:1] + [str(tmp_path / "bad.csv")] + argv[2:] + ["--max-bad-share", "0.1"]))


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path):
    import signal
    cmd = [sys.executable, str(HERE / "train_tiny.py"), *QUICK, "--steps", "100000", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # wait until it trains
        if line.startswith("step     3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130 and "interrupted at step" in rest
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] >= 3 and f"interrupted at step {ckpt['step']}" in rest
