import copy

import pytest
import timm
import torch
from packaging.version import Version
from timm.models.vision_transformer import Attention
from torch.utils.data import DataLoader

from lightly_msn import model as model_module
from lightly_msn.model import MSN, ClassTokenFeatures, default_mask_ratio
from tests._train_helpers import (
    TINY_HEAD,
    FixedViews,
    quiet_cpu_trainer,
    tiny_module,
    tiny_vit,
)


def tiny_views(batch_size: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch_size, 3, 16, 16) for _ in range(2)] + [
        torch.randn(batch_size, 3, 8, 8) for _ in range(3)
    ]


@pytest.mark.parametrize(
    "name, patch_size, expected",
    [
        ("vit_small_patch16_224", None, 0.15),
        ("vit_tiny_patch16_224", 4, 0.15),
        ("vit_base_patch16_224", None, 0.3),
        ("vit_base_patch16_224", 4, 0.7),
        ("vit_large_patch14_224", 7, 0.7),
        ("vit_large_patch16_224", None, 0.3),
    ],
)
def test_default_mask_ratio_follows_the_paper(
    name: str, patch_size: int | None, expected: float
) -> None:
    assert default_mask_ratio(name, patch_size) == expected


def test_forward_shapes_are_view_major() -> None:
    torch.manual_seed(0)
    model = MSN(tiny_vit(), mask_ratio=0.25, **TINY_HEAD)
    views = tiny_views(batch_size=4)
    anchors, targets = model(views, num_random_views=2)
    # 1 masked random anchor view + 3 focal views per image
    assert anchors.shape == (16, 16)
    assert targets.shape == (4, 16)
    assert not targets.requires_grad
    # view-major: the focal block of image 1 equals its own projection alone
    model.eval()
    anchors, _ = model(views, num_random_views=2)
    single = model.forward_anchors([], [views[2][1:2]])
    torch.testing.assert_close(anchors[4 + 1], single[0], atol=1e-5, rtol=1e-5)


def test_random_anchor_views_keep_exactly_the_masked_number_of_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = MSN(tiny_vit(), mask_ratio=0.25, **TINY_HEAD)
    seen: list[int] = []
    original = model.anchor_backbone.preprocess

    def spy(images, idx_mask=None, idx_keep=None, mask=None):  # type: ignore[no-untyped-def]
        tokens = original(images=images, idx_keep=idx_keep)
        seen.append(tokens.shape[1])
        return tokens

    monkeypatch.setattr(model.anchor_backbone, "preprocess", spy)
    model.forward_anchors(tiny_views()[1:2], tiny_views()[2:])
    # 16 patches, 25 % dropped -> 12 patches + class token; focal views unmasked
    assert seen == [13, 5]


def test_focal_masking_makes_focal_anchors_from_the_random_view() -> None:
    model = MSN(
        tiny_vit(),
        focal_masking=True,
        num_focal_masks=3,
        focal_mask_size=2,
        **TINY_HEAD,
    )
    anchors, targets = model(tiny_views()[:2], num_random_views=2)
    assert anchors.shape == (4 * (1 + 3), 16)


def _class_token_outputs_and_grads_match(model_a: MSN, model_b: MSN) -> None:
    """Class token and anchor-encoder gradients of two float64 copies agree."""
    images = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    idx_keep = torch.tensor([[0, 2, 5, 7, 9]] * 3)
    outputs = []
    for model in (model_a, model_b):
        out = model._class_token(model.anchor_backbone, images, idx_keep)
        out.square().sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-10, rtol=1e-10)
    for p_a, p_b in zip(
        model_a.anchor_backbone.parameters(),
        model_b.anchor_backbone.parameters(),
        strict=True,
    ):
        if p_b.grad is not None:
            torch.testing.assert_close(p_a.grad, p_b.grad, atol=1e-10, rtol=1e-8)


def test_fast_class_token_block_matches_the_full_block_with_gradients() -> None:
    torch.manual_seed(0)
    # float64 so that the comparison is not dominated by rounding
    fast = MSN(tiny_vit(qkv_bias=True), mask_ratio=0.25, **TINY_HEAD).double()
    slow = copy.deepcopy(fast)
    slow.fast_class_token = False
    # the shortcut is taken wherever timm has the block layout it mirrors
    expected = Version(timm.__version__) >= Version("1.0.23")
    assert model_module._supports_class_token_block(fast.vit.blocks[-1]) == expected
    _class_token_outputs_and_grads_match(fast, slow)


@pytest.mark.parametrize("fast_class_token", [True, False])
def test_explicit_attention_matches_fused_attention(fast_class_token: bool) -> None:
    # CPULowPrecision switches timm's flag off under CPU bf16 autocast; the
    # class-token shortcut must follow the flag like timm's own Attention
    torch.manual_seed(0)
    fused = MSN(tiny_vit(qkv_bias=True), mask_ratio=0.25, **TINY_HEAD).double()
    fused.fast_class_token = fast_class_token
    explicit = copy.deepcopy(fused)
    for module in explicit.modules():
        if isinstance(module, Attention):
            module.fused_attn = False
    _class_token_outputs_and_grads_match(fused, explicit)


def test_backbone_features_pre_and_post_norm() -> None:
    model = MSN(tiny_vit(), **TINY_HEAD).eval()
    images = torch.randn(2, 3, 16, 16)
    post = model.backbone_features(images, norm=True)
    pre = model.backbone_features(images)
    # post-norm is what timm's forward returns (num_classes=0, class token pooling)
    torch.testing.assert_close(post, model.target_vit(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post, model.target_vit.norm(pre), atol=1e-5, rtol=1e-5)
    features = ClassTokenFeatures(model.target_vit, norm=False)(images)
    torch.testing.assert_close(features, pre, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder must be 'target' or 'anchor'"):
        model.backbone_features(images, encoder="student")


def test_parameter_groups_exclude_biases_norms_and_prototypes_from_decay() -> None:
    model = MSN(tiny_vit(), **TINY_HEAD)
    decay, no_decay, prototypes = model.parameter_groups()
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and prototypes["weight_decay"] == 0.0
    assert prototypes["params"] == [model.prototypes.weight]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in (decay, no_decay, prototypes) for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter once


def test_gradients_reach_anchor_encoder_and_prototypes_but_not_the_target() -> None:
    module = tiny_module(mask_ratio=0.25)
    output = module.compute_loss(tiny_views(), step=0)
    output.loss.backward()
    model = module.model
    for param in [
        *model.target_backbone.parameters(),
        *model.target_projection_head.parameters(),
    ]:
        assert not param.requires_grad and param.grad is None
    assert model.prototypes.weight.grad is not None
    assert model.prototypes.weight.grad.abs().sum() > 0
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_one_training_step_updates_anchor_prototypes_and_target() -> None:
    torch.manual_seed(0)
    module = tiny_module(mask_ratio=0.25, momentum=0.9)
    model = module.model
    before = copy.deepcopy(model.state_dict())
    trainer = quiet_cpu_trainer()
    trainer.fit(module, DataLoader(FixedViews(size=8), batch_size=8))
    after = model.state_dict()

    def changed(prefix: str) -> bool:
        return any(
            not torch.equal(before[k], after[k])
            for k in before
            if k.startswith(prefix) and before[k].is_floating_point()
        )

    assert changed("anchor_backbone.vit.blocks")
    assert changed("anchor_projection_head")
    assert changed("prototypes")
    assert changed("target_backbone.vit.blocks")  # by the EMA update
    # EMA with momentum 0.9: target = 0.9 * old target + 0.1 * new anchor
    key = "vit.blocks.0.mlp.fc1.weight"
    expected = (
        0.9 * before[f"target_backbone.{key}"] + 0.1 * after[f"anchor_backbone.{key}"]
    )
    torch.testing.assert_close(after[f"target_backbone.{key}"], expected)


def test_bf16_autocast_keeps_the_loss_float32_and_finite() -> None:
    module = tiny_module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module.compute_loss(tiny_views(), step=0)
    assert output.loss.dtype == torch.float32
    assert torch.isfinite(output.loss)


def test_bad_model_arguments_raise_clear_errors() -> None:
    import timm

    static = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=0,
    )
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        MSN(static)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        MSN(tiny_vit(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="only apply when vit is a model name"):
        MSN(tiny_vit(), img_size=32)
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        MSN("resnet18")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        MSN(tiny_vit(), **TINY_HEAD).forward_anchors([torch.randn(2, 3, 18, 18)])
    with pytest.raises(ValueError, match="num_random_views=3"):
        MSN(tiny_vit(), **TINY_HEAD)(tiny_views()[:2], num_random_views=3)


def test_update_target_averages_the_heads_batchnorm_statistics() -> None:
    # MSN opts into update_momentum's buffer averaging (lightly's default is off)
    torch.manual_seed(0)
    model = MSN(tiny_vit(), mask_ratio=0.25, **TINY_HEAD)
    model.train()
    model(tiny_views(batch_size=4), num_random_views=2)  # moves the anchor stats
    anchor_norms = [
        m for m in model.anchor_projection_head.modules() if hasattr(m, "running_mean")
    ]
    target_norms = [
        m for m in model.target_projection_head.modules() if hasattr(m, "running_mean")
    ]
    assert anchor_norms and len(anchor_norms) == len(target_norms)
    before = [norm.running_mean.clone() for norm in target_norms]
    model.update_target(0.75)
    for anchor, target, old in zip(anchor_norms, target_norms, before, strict=True):
        assert not torch.equal(anchor.running_mean, old)
        torch.testing.assert_close(
            target.running_mean, 0.75 * old + 0.25 * anchor.running_mean
        )
        assert target.num_batches_tracked == anchor.num_batches_tracked
