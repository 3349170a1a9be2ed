"""SSLModel's structure: what the encoder sees, what each objective builds, the encoder sizes."""

from __future__ import annotations

import pytest
import timm
import torch

from ssl_train.config import load_config
from ssl_train.losses import masked_reconstruction_loss
from ssl_train.models.encoder import encode_visible
from ssl_train.models.masking import mask_order, num_visible, patchify, random_masking, unpatchify
from ssl_train.models.ssl_model import SSLModel
from ssl_train.objectives import StepContext


def _views(config, batch=4):
    size = config.model.image_size
    return {key: torch.randn(batch, 3, size, size) for key in ("view_a", "view_b", "view_mae")}


def _only(config, *names):
    """Train only these of the config's objectives, as configured there."""
    config.objectives = [config.objective(name) for name in names]


def _record_block_inputs(model):
    seen = []
    handle = model.encoder.blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape))
    )
    return seen, handle


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9, 0.6])
def test_encoder_sees_only_visible_tokens_in_masked_branch(tiny_config, mask_ratio):
    _only(tiny_config, "mae")
    tiny_config.objective("mae").mask_ratio = mask_ratio
    model = SSLModel(tiny_config)
    seen, handle = _record_block_inputs(model)
    model(_views(tiny_config))
    handle.remove()
    n = tiny_config.model.num_patches
    expected = round((1 - mask_ratio) * n)
    assert seen == [(4, 1 + expected, tiny_config.model.encoder.embed_dim)]  # class token + visible


def test_hybrid_runs_encoder_on_both_views_and_visible_tokens(tiny_config):
    model = SSLModel(tiny_config)
    seen, handle = _record_block_inputs(model)
    out = model(_views(tiny_config, batch=3))
    handle.remove()
    n = tiny_config.model.num_patches
    assert seen == [(6, 1 + n, 192), (3, 1 + num_visible(n, 0.75), 192)]
    assert set(out.losses) == {"contrastive", "masked"} and set(out.weights) == set(out.losses)


def test_masked_branch_loss_ignores_visible_patches(tiny_config):
    _only(tiny_config, "mae")
    model = SSLModel(tiny_config).eval()
    mae = model.objectives["mae"]
    images = torch.randn(2, 3, 64, 64)
    target = patchify(images, 8)
    with torch.no_grad():
        latent, mask, ids_restore = encode_visible(model.encoder, images, 0.75,
                                                   mask_order(torch.rand(2, 64)))
        pred = mae.decoder(latent, ids_restore)
        base = float(masked_reconstruction_loss(pred, target, mask))
        wrong_where_visible = pred.clone()
        wrong_where_visible[mask == 0] = 1e3
        wrong_where_masked = pred.clone()
        wrong_where_masked[mask == 1] = 1e3
        assert float(masked_reconstruction_loss(wrong_where_visible, target, mask)) == \
            pytest.approx(base)
        assert float(masked_reconstruction_loss(wrong_where_masked, target, mask)) > 1e5


def test_random_masking_keeps_the_right_tokens_and_restores_order():
    tokens = torch.arange(2 * 16, dtype=torch.float).reshape(2, 16, 1)
    visible, mask, ids_restore = random_masking(tokens, 0.75, mask_order(torch.rand(2, 16)))
    assert visible.shape == (2, 4, 1)
    assert mask.sum(1).tolist() == [12, 12]
    for b in range(2):
        kept = sorted(int(v) - 16 * b for v in visible[b, :, 0])
        assert kept == sorted(torch.nonzero(mask[b] == 0).flatten().tolist())
    # Unshuffling the kept-then-dropped order with ids_restore gives back the original order.
    shuffled_order = torch.argsort(ids_restore, dim=1)
    restored = torch.gather(shuffled_order, 1, ids_restore)
    assert torch.equal(restored, torch.arange(16).expand(2, 16))


def test_masking_is_decided_by_integer_orders_whatever_the_token_dtype():
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(4))
    tokens = torch.randn(2, 64, 8)
    _, mask_fp32, _ = random_masking(tokens, 0.75, mask_order(noise))
    _, mask_bf16, _ = random_masking(tokens.bfloat16(), 0.75, mask_order(noise))
    assert torch.equal(mask_fp32, mask_bf16.float())
    # Noise itself is refused: a bf16 cast on the way in would round it into ties.
    with pytest.raises(TypeError, match="mask_order"):
        random_masking(tokens, 0.75, noise)


def test_patchify_roundtrip():
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 192)
    assert torch.equal(unpatchify(patches, 8), images)
    assert torch.equal(patches[0, 1].reshape(8, 8, 3).permute(2, 0, 1), images[0, :, :8, 8:16])


@pytest.mark.parametrize("objectives,losses,views", [
    (["simclr"], {"contrastive"}, {"view_a", "view_b"}),
    (["mae"], {"masked"}, {"view_mae"}),
    (["simclr", "mae"], {"contrastive", "masked"}, {"view_a", "view_b", "view_mae"}),
])
def test_each_objective_builds_and_trains_only_its_heads(tiny_config, objectives, losses, views):
    _only(tiny_config, *objectives)
    model = SSLModel(tiny_config)
    assert list(model.objectives) == objectives
    assert {view.name for view in tiny_config.views()} == views
    heads = {name for name, _ in model.named_children()} - {"encoder", "weighting"}
    assert heads == {"objectives"}
    out = model({k: v for k, v in _views(tiny_config).items() if k in views})
    out.loss.backward()
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())
    assert all(p.grad is not None for p in model.objectives.parameters() if p.requires_grad)
    assert set(out.losses) == losses


def test_fixed_weights_combine_losses_as_configured(tiny_config):
    tiny_config.weighting = "fixed"
    tiny_config.objective("simclr").weight = 0.3
    tiny_config.objective("mae").weight = 2.0
    model = SSLModel(tiny_config)
    out = model(_views(tiny_config))
    expected = 0.3 * out.losses["contrastive"] + 2.0 * out.losses["masked"]
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert {k: float(v) for k, v in out.weights.items()} == pytest.approx(
        {"contrastive": 0.3, "masked": 2.0}
    )


def test_learned_weighting_is_uncertainty_weighting(tiny_config):
    model = SSLModel(tiny_config)
    with torch.no_grad():
        model.weighting.log_vars.copy_(torch.tensor([0.5, -0.25]))
    out = model(_views(tiny_config))
    c, m = out.losses["contrastive"], out.losses["masked"]
    expected = torch.exp(torch.tensor(-0.5)) * c + 0.5 + torch.exp(torch.tensor(0.25)) * m - 0.25
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    out.loss.backward()
    assert model.weighting.log_vars.grad.abs().min() > 0


@pytest.mark.parametrize("config_name,timm_name", [
    ("vit-s16", "vit_small_patch16_224"),
    ("vit-b16", "vit_base_patch16_224"),
    ("vit-l16", "vit_large_patch16_224"),
])
def test_packaged_encoders_have_timm_architectures(config_name, timm_name):
    config = load_config(config_name)
    with torch.device("meta"):
        model = SSLModel(config)
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
    ours = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    decoder = config.objective("mae").decoder
    assert decoder.embed_dim < config.model.encoder.embed_dim
    assert decoder.depth < config.model.encoder.depth


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_positional_embeddings_follow_the_config(tiny_config, pos_embed):
    tiny_config.model.encoder.pos_embed = pos_embed
    model = SSLModel(tiny_config)
    n = tiny_config.model.num_patches
    decoder = model.objectives["mae"].decoder
    assert model.encoder.pos_embed.shape == (1, 1 + n, 192)
    assert decoder.pos_embed.shape == (1, 1 + n, tiny_config.objective("mae").decoder.embed_dim)
    learned = pos_embed == "learned"
    assert model.encoder.pos_embed.requires_grad is learned
    assert decoder.pos_embed.requires_grad is learned
    if not learned:  # sine-cosine rows differ from one another and are not all zero
        rows = model.encoder.pos_embed[0, 1:]
        assert torch.linalg.matrix_rank(rows) > 8


def test_masking_orders_are_drawn_for_the_global_batch(tiny_config):
    """Rank r of N gets rows r*B/N.. of the order one worker holding the whole batch gets."""
    model = SSLModel(tiny_config)
    whole = model.step_inputs(StepContext(0, 7, 0, 1, 8))["mask_order"]
    halves = [model.step_inputs(StepContext(0, 7, rank, 2, 8))["mask_order"] for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(model.step_inputs(StepContext(0, 8, 0, 1, 8))["mask_order"], whole)
