"""The improved-CLIP model: separate projectors/scales, strong-text residual dropout, drop path."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from training.improved_model import ImprovedCLIP, ImprovedEmbedder, find_resblocks

B, L, IMG, VOCAB = 6, 12, 32, 49408
SMALL = {"mlp_hidden_dim": 64, "proj_dim": 16}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("model_configs")
    cfg = {"embed_dim": 24,
           "vision_cfg": {"image_size": IMG, "layers": 2, "width": 32, "head_width": 16,
                          "patch_size": 8},
           "text_cfg": {"context_length": L, "vocab_size": VOCAB, "width": 32, "heads": 2,
                        "layers": 3}}
    (folder / "test-improved-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "test-improved-tiny"


@pytest.fixture
def clip(tiny_arch):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(tiny_arch, pretrained=None)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(B, 3, IMG, IMG, generator=g),
            "text": torch.randint(1, VOCAB, (B, L), generator=g),
            "image_strong": torch.randn(B, 2, 3, IMG, IMG, generator=g),
            "text_strong": torch.randint(1, VOCAB, (B, 2, L), generator=g)}


def _infonce(a, b, scale, smoothing=0.0):
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, target, label_smoothing=smoothing)
            + F.cross_entropy(logits.T, target, label_smoothing=smoothing)) / 2


def _strong_loss(out):
    return sum(_infonce(x, y, out["logit_scale_strong"], 0.1)
               for x in out["image_strong"] for y in out["text_strong"]) / 4


def test_shapes_normalisation_and_scales(clip):
    model = ImprovedCLIP(clip, SMALL)
    out = model(**{"images_weak": _batch()["image"], "texts_weak": _batch()["text"],
                   "images_strong": _batch()["image_strong"],
                   "texts_strong": _batch()["text_strong"]})
    assert out["image"].shape == out["text"].shape == (B, 16)
    assert out["image_pooled"].shape == (B, 24)
    assert len(out["image_strong"]) == len(out["text_strong"]) == 2
    for x in [out["image"], out["text"], *out["image_strong"], *out["text_strong"]]:
        assert x.shape == (B, 16)
        assert torch.allclose(x.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_scale_strong"].item() == pytest.approx(1 / 0.1, rel=1e-5)
    assert not clip.logit_scale.requires_grad  # open_clip's own scale is unused
    with torch.no_grad():
        model.log_scale.fill_(8.0)
    assert model.logit_scale().item() == pytest.approx(100.0)
    model.clamp_logit_scale()
    assert model.log_scale.item() == pytest.approx(math.log(100))
    # default projector sizes of SPEC 5: linear 256 without bias; MLP 4096-BN-ReLU-4096-BN-ReLU-256
    full = ImprovedCLIP(copy.deepcopy(clip))
    assert full.image_proj.weight.shape == (256, 24) and full.image_proj.bias is None
    linears = [m for m in full.text_proj_strong if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [4096, 4096, 256]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in full.text_proj_strong) == 2


def test_batch_dict_and_view_layouts_agree(clip):
    model = ImprovedCLIP(clip, SMALL).eval()
    b = _batch(1)
    with torch.no_grad():
        from_dict = model(b)
        from_lists = model(b["image"], b["text"],
                           [b["image_strong"][:, 0], b["image_strong"][:, 1]],
                           [b["text_strong"][:, 0], b["text_strong"][:, 1]])
        weak_only = model(b["image"], b["text"])
    for k in ("image", "text"):
        assert torch.allclose(from_dict[k], from_lists[k], atol=1e-6)
        assert torch.allclose(from_dict[k], weak_only[k], atol=1e-6)
    for k in ("image_strong", "text_strong"):
        for x, y in zip(from_dict[k], from_lists[k]):
            assert torch.allclose(x, y, atol=1e-5)
    assert "image_strong" not in weak_only
    # view v of the dict layout is the strong tower output of column v
    with torch.no_grad():
        pooled = model.text_tower(b["text_strong"][:, 1])
        direct = F.normalize(model.text_proj_strong(pooled), dim=-1)
    assert torch.allclose(from_dict["text_strong"][1], direct, atol=1e-5)


def test_text_residual_dropout_only_on_strong_views_in_train_mode(clip):
    model = ImprovedCLIP(clip, {**SMALL, "text_residual_dropout": 0.5})
    tokens = _batch()["text"]
    blocks, _ = find_resblocks(clip, "text")
    seen = []
    probe = blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    model.train()
    with torch.no_grad():
        weak1, weak2 = model.text_tower(tokens), model.text_tower(tokens)
        strong1, strong2 = model.text_tower(tokens, strong=True), model.text_tower(tokens,
                                                                                   strong=True)
    assert torch.equal(weak1, weak2)  # no dropout on the weak views
    assert not torch.allclose(strong1, strong2)  # stochastic on the strong views
    zeros = [(s == 0).float().mean().item() for s in seen]
    assert zeros[0] == 0.0 and zeros[1] == 0.0  # weak passes: residual stream intact
    assert 0.4 < zeros[2] < 0.6 and 0.4 < zeros[3] < 0.6  # strong passes: p = 0.5 dropped
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.text_tower(tokens, strong=True), model.text_tower(tokens))
    probe.remove()
    # in a full forward the strong texts get dropout and the weak ones do not
    model.train()
    b = _batch()
    b["text_strong"] = torch.stack([b["text"], b["text"]], 1)
    b["image_strong"] = torch.stack([b["image"], b["image"]], 1)
    with torch.no_grad():
        out = model(b)
        ref = F.normalize(model.text_proj(model.text_tower(b["text"])), dim=-1)
    assert torch.allclose(out["text"], ref, atol=1e-6)
    no_drop = ImprovedCLIP(copy.deepcopy(clip), SMALL)
    no_drop.load_state_dict(model.state_dict())
    no_drop.train()
    with torch.no_grad():
        clean = no_drop(b)
    assert torch.allclose(out["image_strong"][0], clean["image_strong"][0], atol=1e-5)
    assert not torch.allclose(out["text_strong"][0], clean["text_strong"][0], atol=1e-3)


def test_drop_path_is_stochastic_in_train_and_off_in_eval(clip):
    plain = ImprovedCLIP(copy.deepcopy(clip), SMALL)
    dp = ImprovedCLIP(copy.deepcopy(clip), {**SMALL, "drop_path": 0.5})
    dp.load_state_dict(plain.state_dict())
    images = _batch()["image"]
    plain.eval(), dp.eval()
    with torch.no_grad():
        assert torch.allclose(dp.image_tower(images), plain.image_tower(images), atol=1e-6)
        dp.train()
        a, b = dp.image_tower(images), dp.image_tower(images)
    assert not torch.allclose(a, b)
    assert a.shape == (B, 24) and torch.isfinite(a).all()


def test_weak_and_strong_heads_are_separate(clip):
    model = ImprovedCLIP(clip, SMALL).train()
    out = model(_batch())
    _infonce(out["image"], out["text"], out["logit_scale"]).backward()
    strong_params = [*model.image_proj_strong.parameters(), *model.text_proj_strong.parameters(),
                     model.log_scale_strong]
    assert all(p.grad is None or not p.grad.any() for p in strong_params)
    assert model.image_proj.weight.grad.abs().sum() > 0 and model.log_scale.grad is not None
    assert clip.visual.conv1.weight.grad.abs().sum() > 0  # the towers learn from both

    model.zero_grad(set_to_none=True)
    _strong_loss(model(_batch())).backward()
    weak_params = [model.image_proj.weight, model.text_proj.weight, model.log_scale]
    assert all(p.grad is None or not p.grad.any() for p in weak_params)
    assert model.log_scale_strong.grad is not None
    assert model.text_proj_strong[0].weight.grad.abs().sum() > 0
    assert clip.token_embedding.weight.grad.abs().sum() > 0


def test_a_few_steps_lower_the_recipe_loss(clip):
    model = ImprovedCLIP(clip, {**SMALL, "text_residual_dropout": 0.1, "drop_path": 0.1})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    b = _batch(2)
    losses = []
    for _ in range(8):
        out = model(b)
        loss = (_infonce(out["image"], out["text"], out["logit_scale"]) + 2 * _strong_loss(out)) / 3
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_embedder_returns_weak_and_strong_and_restores_mode(clip):
    model = ImprovedCLIP(clip, {**SMALL, "text_residual_dropout": 0.3}).train()
    emb = ImprovedEmbedder(model, preprocess="pp", tokenizer="tok")
    b = _batch()
    img, txt = emb.encode_image(b["image"]), emb.encode_text(b["text"])
    assert set(img) == set(txt) == {"weak", "strong"}
    assert model.training  # mode restored
    for x in [*img.values(), *txt.values()]:
        assert x.shape == (B, 16) and not x.requires_grad
        assert torch.allclose(x.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert not torch.allclose(img["weak"], img["strong"])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(img["weak"], model.encode_image(b["image"]), atol=1e-6)
        strong_eval = model(b)["text_strong"]  # eval: no dropout, eval BatchNorm
        direct = emb.encode_text(b["text_strong"][:, 0])["strong"]
    assert torch.allclose(strong_eval[0], direct, atol=1e-5)
    assert emb.preprocess == "pp" and emb.tokenizer == "tok"


def test_config_errors(clip):
    with pytest.raises(ValueError, match="unknown config key .model.improved.proj_dims."):
        ImprovedCLIP(clip, {"proj_dims": 128})
    with pytest.raises(ValueError, match="text_residual_dropout"):
        ImprovedCLIP(clip, {"text_residual_dropout": 1.0})
    with pytest.raises(ValueError, match="strong_temperature"):
        ImprovedCLIP(clip, {"strong_temperature": 0})
    with pytest.raises(ValueError, match="texts_strong"):
        ImprovedCLIP(clip, SMALL)(_batch()["image"], _batch()["text"], texts_strong=[])


def test_deepcopy_keeps_hooks_on_the_copy(clip):
    """An EMA/target copy (copy.deepcopy) has its own dropout/drop-path hooks and mode."""
    model = ImprovedCLIP(clip, {**SMALL, "text_residual_dropout": 0.5, "drop_path": 0.5})
    target = copy.deepcopy(model).eval()
    model.train()
    b = _batch()
    with torch.no_grad():
        assert torch.equal(target.image_tower(b["image"]), target.image_tower(b["image"]))
        assert torch.equal(target.text_tower(b["text"], strong=True),
                           target.text_tower(b["text"], strong=True))
        assert not torch.equal(model.image_tower(b["image"]), model.image_tower(b["image"]))


def test_pooled_features_for_the_ssl_companions(clip):
    """``text_pooled`` / ``*_strong_pooled`` are the tower outputs the projectors were applied to."""
    model = ImprovedCLIP(clip, SMALL).eval()
    b = _batch(2)
    with torch.no_grad():
        out = model(b)
        assert torch.allclose(out["text_pooled"], model.text_tower(b["text"]), atol=1e-5)
        assert torch.allclose(out["text"], F.normalize(model.text_proj(out["text_pooled"]), dim=-1), atol=1e-6)
        assert len(out["image_strong_pooled"]) == len(out["text_strong_pooled"]) == 2
        for v in range(2):
            img = out["image_strong_pooled"][v]
            assert torch.allclose(img, model.image_tower(b["image_strong"][:, v]), atol=1e-5)
            assert torch.allclose(out["image_strong"][v],
                                  F.normalize(model.image_proj_strong(img), dim=-1), atol=1e-5)
            txt = out["text_strong_pooled"][v]
            assert txt.shape == (B, 24)
            assert torch.allclose(out["text_strong"][v],
                                  F.normalize(model.text_proj_strong(txt), dim=-1), atol=1e-5)


def test_sync_batchnorm_only_with_a_multi_rank_group(clip):
    from training.improved_model import should_sync_batchnorm, to_sync_batchnorm

    model = ImprovedCLIP(clip, SMALL)
    # no process group: every mode leaves the BatchNorms alone
    for mode in ("auto", True, False):
        assert should_sync_batchnorm(mode) is False
        assert to_sync_batchnorm(model, mode) is model
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(ValueError, match="sync_bn"):
        should_sync_batchnorm("sometimes")
