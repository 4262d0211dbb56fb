"""Tests for allinone.py and train_tiny.py. Quick, CPU only: python -m pytest -q test_allinone.py"""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

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
