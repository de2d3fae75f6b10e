"""The MSN model: anchor and target Vision Transformers, projection heads, prototypes.

"MSN [...] matches the representation of an image view containing randomly masked
patches to the representation of the original unmasked image" [0]. The anchor encoder
sees random views with dropped patches and small focal views; the target encoder, an
exponential moving average of the anchor encoder, sees an unmasked random view.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightly.models.modules import MaskedVisionTransformerTIMM
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from lightly_msn.ema import update_momentum
from lightly_msn.heads import MSNProjectionHead, MSNPrototypes
from lightly_msn.masking import focal_token_mask, random_token_mask
from lightly_msn.schedules import weight_decay_groups

# Patch drop ratios of the paper ([0], Appendix C): 0.15 for ViT-S/16, 0.3 for
# ViT-B/16 and 0.7 for ViT-L/7 and ViT-B/4. Keyed by (model size, patch size <= n).
_PAPER_MASK_RATIOS: tuple[tuple[str, int, float], ...] = (
    ("base", 8, 0.7),
    ("large", 8, 0.7),
    ("huge", 8, 0.7),
    ("base", 32, 0.3),
    ("large", 32, 0.3),
    ("huge", 32, 0.3),
)
_SMALL_MODEL_MASK_RATIO = 0.15


def default_mask_ratio(model_name: str, patch_size: int | None = None) -> float:
    """Returns the paper's patch drop ratio for a timm ViT name.

    The paper ([0], Appendix C) drops 15 % of the patches for ViT-S/16, 30 % for
    ViT-B/16 and 70 % for ViT-L/7 and ViT-B/4. Tiny and small models (and names
    without a size) get 0.15; base and larger models get 0.3 with patches of 16 or
    more pixels and 0.7 with patches of 8 or fewer.

    Args:
        model_name:
            A timm model name such as ``vit_small_patch16_224``.
        patch_size:
            The patch size actually used, when it overrides the name's.
    """
    name = model_name.lower()
    match = re.search(r"patch(\d+)", name)
    if patch_size is None:
        patch_size = int(match.group(1)) if match else 16
    for size, max_patch_size, ratio in _PAPER_MASK_RATIOS:
        if size in name and patch_size <= max_patch_size:
            return ratio
    return _SMALL_MODEL_MASK_RATIO


def create_vit(
    model_name: str,
    img_size: int | None = None,
    patch_size: int | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> VisionTransformer:
    """Creates a timm ViT without a classifier and with ``dynamic_img_size=True``.

    ``dynamic_img_size`` lets views of another resolution (the focal views) pass
    through the same trunk: the position embedding is resampled to their grid.
    """
    overrides: dict[str, Any] = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if img_size is not None:
        overrides["img_size"] = img_size
    if patch_size is not None:
        overrides["patch_size"] = patch_size
    try:
        vit = timm.create_model(model_name, pretrained=pretrained, **overrides)
    except TypeError as error:  # a non-ViT rejects the ViT arguments
        raise ValueError(
            f"MSN needs a timm VisionTransformer; {model_name!r} does not accept "
            f"the ViT arguments {sorted(overrides)}: {error}"
        ) from error
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"MSN needs a timm VisionTransformer, but {model_name!r} creates a "
            f"{type(vit).__name__}."
        )
    return vit


class MSN(nn.Module):
    """Masked Siamese Networks [0]: anchor and target encoders, heads and prototypes.

    "The anchor view is processed by [the encoder] with masking [...] the target
    view is processed by [the target encoder] without masking. [...] The parameters
    of the target encoder are updated via an exponential moving average of the
    anchor encoder" [0]. The representation of an image is the class token.

    Anchors are the random views with a fraction ``mask_ratio`` of their patches
    dropped (per sample, exactly) and the focal views, unmasked, as in the official
    code. With ``focal_masking=True`` the focal anchors are instead made from the
    first random anchor view by keeping one random square block of
    ``focal_mask_size`` x ``focal_mask_size`` patches (token-level focal masking),
    so no separate focal crops are needed. Views of the same resolution go through
    the encoder as one batch.

    - [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141

    Attributes:
        vit:
            A timm ``VisionTransformer`` created with ``dynamic_img_size=True``, or
            the name of one (created with ``num_classes=0``).
        img_size:
            Image size of the random views, when ``vit`` is a name.
        patch_size:
            Patch size, when ``vit`` is a name (e.g. 4 for 32 px images).
        mask_ratio:
            Fraction of the patches dropped from the random anchor views. ``None``
            uses the paper's ratio for the model (see :func:`default_mask_ratio`).
        focal_masking:
            Make the focal anchors by token-level focal masking of the first random
            anchor view instead of using focal crops.
        num_focal_masks:
            Number of focal masks per image with ``focal_masking``.
        focal_mask_size:
            Side of the kept block, in patches, with ``focal_masking``; ``None``
            keeps a block covering 3/7 of the grid side (96 of 224 px, as the
            focal crops of the paper).
        hidden_dim:
            Hidden dimension of the projection head.
        output_dim:
            Output dimension of the projection head and of the prototypes.
        num_prototypes:
            Number of learnable prototypes.
        pretrained:
            Load timm's pretrained weights when ``vit`` is a name.
        fast_class_token:
            Compute the last transformer block for the class token only: the
            result is identical (only the class token is used) and the last block
            costs a fraction of its full FLOPs.
            Applies to timm's standard ``Block`` as of timm 1.0.23; other blocks
            (and older timm versions) run in full.
        **vit_kwargs:
            Further keyword arguments for ``timm.create_model``, e.g.
            ``drop_path_rate``.

    Examples:
        >>> model = MSN("vit_tiny_patch16_224", img_size=32, patch_size=4)
        >>> views = [torch.randn(8, 3, 32, 32) for _ in range(2)]
        >>> views += [torch.randn(8, 3, 16, 16) for _ in range(4)]
        >>> anchors, targets = model(views, num_random_views=2)
        >>> anchors.shape, targets.shape  # 5 anchor views per image
        (torch.Size([40, 256]), torch.Size([8, 256]))
    """

    def __init__(
        self,
        vit: str | VisionTransformer = "vit_small_patch16_224",
        img_size: int | None = None,
        patch_size: int | None = None,
        mask_ratio: float | None = None,
        focal_masking: bool = False,
        num_focal_masks: int = 10,
        focal_mask_size: int | None = None,
        hidden_dim: int = 2048,
        output_dim: int = 256,
        num_prototypes: int = 1024,
        pretrained: bool = False,
        fast_class_token: bool = True,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(vit, str):
            for what, size in (("img_size", img_size), ("patch_size", patch_size)):
                if size is not None and size < 1:
                    raise ValueError(f"MSN: {what} must be positive, got {size}.")
            model_name = vit
            vit = create_vit(
                vit,
                img_size=img_size,
                patch_size=patch_size,
                pretrained=pretrained,
                **vit_kwargs,
            )
        elif isinstance(vit, VisionTransformer):
            if img_size is not None or patch_size is not None or vit_kwargs:
                raise ValueError(
                    "MSN: img_size, patch_size and timm keyword arguments only apply "
                    "when vit is a model name; got a VisionTransformer instance."
                )
            if not vit.dynamic_img_size:
                raise ValueError(
                    "MSN: the ViT must be created with dynamic_img_size=True so focal "
                    "views of another resolution can pass through it, e.g. "
                    "timm.create_model(name, dynamic_img_size=True, num_classes=0)."
                )
            model_name = str(getattr(vit, "default_cfg", {}).get("architecture", ""))
        else:
            raise ValueError(
                f"MSN: vit must be a timm model name or VisionTransformer, got "
                f"{type(vit).__name__}."
            )
        if vit.cls_token is None or vit.num_prefix_tokens != 1:
            raise ValueError(
                "MSN: the ViT needs exactly one prefix token, the class token (the "
                f"MSN representation); got num_prefix_tokens={vit.num_prefix_tokens}, "
                f"class token {'present' if vit.cls_token is not None else 'absent'}."
            )
        vit_patch_size = _patch_size(vit)
        grid = vit.patch_embed.img_size
        if grid is not None and any(side % vit_patch_size for side in grid):
            raise ValueError(
                f"MSN: the image size {tuple(grid)} is not a multiple of the patch "
                f"size {vit_patch_size}."
            )
        if mask_ratio is None:
            mask_ratio = default_mask_ratio(model_name, vit_patch_size)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MSN: mask_ratio must be in [0, 1), got {mask_ratio}.")
        if num_focal_masks < 1:
            raise ValueError(
                f"MSN: num_focal_masks must be >= 1, got {num_focal_masks}."
            )

        self.model_name = model_name
        self.mask_ratio = mask_ratio
        self.focal_masking = focal_masking
        self.num_focal_masks = num_focal_masks
        self.focal_mask_size = focal_mask_size
        self.fast_class_token = fast_class_token
        self.patch_size = vit_patch_size
        self.embed_dim = int(vit.embed_dim)

        # keep timm's initialisation (or pretrained weights) and a learnable
        # position embedding, as the official code; MSN drops patches and never
        # uses a mask token
        self.anchor_backbone = MaskedVisionTransformerTIMM(
            vit=vit, weight_initialization="skip", pos_embed_initialization="skip"
        )
        self.anchor_backbone.mask_token.requires_grad_(False)
        self.anchor_projection_head = MSNProjectionHead(
            input_dim=self.embed_dim, hidden_dim=hidden_dim, output_dim=output_dim
        )
        self.target_backbone = copy.deepcopy(self.anchor_backbone)
        self.target_projection_head = copy.deepcopy(self.anchor_projection_head)
        for module in (self.target_backbone, self.target_projection_head):
            module.requires_grad_(False)
        self.prototypes = MSNPrototypes(num_prototypes=num_prototypes, dim=output_dim)

    @property
    def vit(self) -> VisionTransformer:
        """The anchor encoder's timm ViT (trained by gradient descent)."""
        vit: VisionTransformer = self.anchor_backbone.vit
        return vit

    @property
    def target_vit(self) -> VisionTransformer:
        """The target encoder's timm ViT (the EMA copy used for evaluation)."""
        vit: VisionTransformer = self.target_backbone.vit
        return vit

    def forward(
        self, views: Sequence[Tensor], num_random_views: int = 2
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(anchors, targets)`` projections for the MSN loss.

        Args:
            views:
                ``[target view, random anchor views..., focal views...]`` as produced
                by ``MSNTransform`` (each ``(B, C, H, W)``).
            num_random_views:
                Number of random views including the target view (the transform's
                ``random_views``); the remaining views are focal views.

        Returns:
            ``anchors`` of shape ``(B * M, output_dim)``, view-major (anchor ``i``
            belongs to image ``i % B``), and ``targets`` of shape ``(B, output_dim)``.
        """
        if not 1 <= num_random_views <= len(views):
            raise ValueError(
                f"MSN.forward: num_random_views={num_random_views} must be between 1 "
                f"and the number of views ({len(views)})."
            )
        targets = self.forward_targets(views[0])
        anchors = self.forward_anchors(
            views[1:num_random_views], views[num_random_views:]
        )
        return anchors, targets

    @torch.no_grad()
    def forward_targets(self, images: Tensor) -> Tensor:
        """Target projections ``(B, output_dim)`` of unmasked views, no gradient."""
        features = self._class_token(self.target_backbone, images, idx_keep=None)
        return self.target_projection_head(features)

    def forward_anchors(
        self, random_views: Sequence[Tensor], focal_views: Sequence[Tensor] = ()
    ) -> Tensor:
        """Anchor projections ``(B * M, output_dim)``, view-major.

        Random views are concatenated into one batch and get random patch dropping;
        focal views of the same resolution are concatenated into one batch each and
        are not masked (official code). With ``focal_masking`` the focal anchors are
        focal-masked copies of the first random view instead.
        """
        if not random_views and not focal_views:
            raise ValueError("MSN.forward_anchors: got no anchor views.")
        features: list[Tensor] = []
        if random_views:
            images = _concat_same_size(random_views, "random anchor views")
            idx_keep = None
            if self.mask_ratio > 0:
                idx_keep, _ = random_token_mask(
                    size=(images.shape[0], self._sequence_length(images)),
                    mask_ratio=self.mask_ratio,
                    device=images.device,
                )
            features.append(self._class_token(self.anchor_backbone, images, idx_keep))
        if self.focal_masking:
            if not random_views:
                raise ValueError(
                    "MSN.forward_anchors: focal_masking needs a random anchor view."
                )
            features.append(self._focal_masked_features(random_views[0]))
        for group in _groups_of_same_size(focal_views):
            images = torch.cat(list(group))
            features.append(self._class_token(self.anchor_backbone, images, None))
        # the head (and its BatchNorm statistics) runs per group of views, as the
        # official code and lightly's example do
        return torch.cat([self.anchor_projection_head(f) for f in features])

    @torch.no_grad()
    def backbone_features(
        self, images: Tensor, encoder: str = "target", norm: bool = False
    ) -> Tensor:
        """Returns the class token ``(B, embed_dim)`` for evaluation.

        Args:
            images:
                Images ``(B, C, H, W)``.
            encoder:
                ``"target"`` (the EMA encoder, what the paper evaluates) or
                ``"anchor"``.
            norm:
                Apply the final LayerNorm. The official evaluation uses the class
                token before the final norm (``norm=False``); timm's ``forward``
                (and an exported backbone loaded in timm) returns it after the norm.
        """
        if encoder not in ("target", "anchor"):
            raise ValueError(
                f"MSN.backbone_features: encoder must be 'target' or 'anchor', got "
                f"{encoder!r}."
            )
        backbone = self.target_backbone if encoder == "target" else self.anchor_backbone
        return self._class_token(backbone, images, idx_keep=None, norm=norm)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA update of the target encoder and head: ``t = m * t + (1 - m) * a``.

        Buffers included: the target head's BatchNorm statistics get the same
        moving average (integer counters are copied), see :func:`update_momentum`.
        """
        update_momentum(
            self.anchor_backbone, self.target_backbone, momentum, update_buffers=True
        )
        update_momentum(
            self.anchor_projection_head,
            self.target_projection_head,
            momentum,
            update_buffers=True,
        )

    def anchor_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters of the anchor encoder and head (not prototypes)."""
        for module in (self.anchor_backbone, self.anchor_projection_head):
            yield from (p for p in module.parameters() if p.requires_grad)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups as in the official code.

        Weight decay applies to the weight matrices (and the class token and
        position embedding); biases, other 1-D parameters (norms) and the
        prototypes get none (see :func:`~lightly_msn.schedules.weight_decay_groups`).
        """
        return weight_decay_groups(
            [self.anchor_backbone, self.anchor_projection_head], [self.prototypes]
        )

    def backbone_state_dict(self, encoder: str = "target") -> dict[str, Tensor]:
        """The timm ViT's state dict (keys as in ``timm.create_model``)."""
        vit = self.target_vit if encoder == "target" else self.vit
        return {k: v.detach().clone() for k, v in vit.state_dict().items()}

    def _sequence_length(self, images: Tensor) -> int:
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"MSN: image size {height}x{width} is not a multiple of the patch "
                f"size {self.patch_size}."
            )
        grid = (height // self.patch_size) * (width // self.patch_size)
        return grid + 1

    def _focal_masked_features(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        block = self.focal_mask_size or max(1, round(min(grid) * 3 / 7))
        repeated = images.repeat(self.num_focal_masks, 1, 1, 1)
        idx_keep = focal_token_mask(
            size=(repeated.shape[0], grid[0] * grid[1] + 1),
            grid_size=grid,
            block_size=(block, block),
            device=images.device,
        )
        return self._class_token(self.anchor_backbone, repeated, idx_keep)

    def _class_token(
        self,
        backbone: MaskedVisionTransformerTIMM,
        images: Tensor,
        idx_keep: Tensor | None,
        norm: bool = True,
    ) -> Tensor:
        """Class token after the last block (and final norm), kept tokens only."""
        vit = backbone.vit
        tokens = backbone.preprocess(images=images, idx_keep=idx_keep)
        tokens = vit.norm_pre(tokens)
        blocks = list(vit.blocks)
        last = blocks[-1]
        if self.fast_class_token and _supports_class_token_block(last):
            for block in blocks[:-1]:
                tokens = block(tokens)
            cls = _class_token_block(last, tokens)
        else:
            cls = vit.blocks(tokens)[:, 0]
        return vit.norm(cls) if norm else cls


def load_backbone(path: str | Path, norm: bool = False) -> nn.Module:
    """Loads a pretrained MSN backbone that maps images to ``(N, D)`` features.

    Args:
        path:
            A Lightning checkpoint written by ``lightly-msn pretrain`` (``.ckpt``)
            or an exported ``backbone.safetensors``.
        norm:
            Apply the ViT's final LayerNorm to the class token (``False``: the
            pre-norm class token of the official evaluation).

    Returns:
        The target encoder as a module in eval mode; ``module(images)`` returns the
        class token features.
    """
    from lightly_msn.checkpoint import load_backbone_vit

    vit = load_backbone_vit(path)
    return ClassTokenFeatures(vit, norm=norm).eval()


class ClassTokenFeatures(nn.Module):
    """Wraps a timm ViT to return its class token, before or after the final norm.

    Attributes:
        vit:
            A timm ``VisionTransformer``.
        norm:
            Apply the final LayerNorm.
    """

    def __init__(self, vit: VisionTransformer, norm: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.norm = norm

    def forward(self, images: Tensor) -> Tensor:
        vit = self.vit
        tokens = vit.patch_drop(vit._pos_embed(vit.patch_embed(images)))
        cls = vit.blocks(vit.norm_pre(tokens))[:, 0]
        return self.vit.norm(cls) if self.norm else cls


def _patch_size(vit: VisionTransformer) -> int:
    size = vit.patch_embed.patch_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ValueError(f"MSN: only square patches are supported, got {size}.")
    return int(height)


def _concat_same_size(views: Sequence[Tensor], what: str) -> Tensor:
    shapes = {tuple(view.shape[1:]) for view in views}
    if len(shapes) != 1:
        raise ValueError(f"MSN: the {what} must all have the same size, got {shapes}.")
    return torch.cat(list(views))


def _groups_of_same_size(views: Sequence[Tensor]) -> list[list[Tensor]]:
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for view in views:
        groups.setdefault(tuple(view.shape[1:]), []).append(view)
    return list(groups.values())


def _supports_class_token_block(block: nn.Module) -> bool:
    # _class_token_block mirrors timm's Block and Attention as of timm 1.0.23
    # (attn_dim, the optional scale norm); other layouts run the full block
    return (
        type(block) is Block
        and type(block.attn) is Attention
        and hasattr(block.attn, "attn_dim")
        and hasattr(block.attn, "norm")
        and getattr(block.attn, "gate", None) is None
    )


def _class_token_block(block: Any, tokens: Tensor) -> Tensor:
    """``block(tokens)[:, 0]`` computed for the class token query only.

    The keys and values need every token, but the query, the attention output,
    the projection and the MLP are only needed for the class token: the block's
    cost falls from about ``12 N d^2`` to ``2 N d^2`` multiply-adds.
    """
    attn = block.attn
    batch_size, num_tokens, _ = tokens.shape
    heads, head_dim, attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
    normed = block.norm1(tokens)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    query = F.linear(
        normed[:, :1], weight[:attn_dim], None if bias is None else bias[:attn_dim]
    )
    key_value = F.linear(
        normed, weight[attn_dim:], None if bias is None else bias[attn_dim:]
    )
    query = query.reshape(batch_size, 1, heads, head_dim).transpose(1, 2)
    key, value = key_value.reshape(batch_size, num_tokens, 2, heads, head_dim).permute(
        2, 0, 3, 1, 4
    )
    query, key = attn.q_norm(query), attn.k_norm(key)
    if attn.fused_attn:  # timm's own switch, as its Attention.forward
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        weights = (query * attn.scale) @ key.transpose(-2, -1)
        out = attn.attn_drop(weights.softmax(dim=-1)) @ value
    out = out.transpose(1, 2).reshape(batch_size, attn_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    cls = tokens[:, 0] + block.drop_path1(block.ls1(out))
    return cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))
