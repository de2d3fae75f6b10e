"""``lightly-msn demo``: MSN on scikit-learn's bundled digits, no download, CPU only.

Pretrains a small ViT with MSN on the 1,437 training digits (8x8 pixels, upsampled),
then compares the kNN accuracy on the 360 test digits of its features with the
features of the same ViT at random initialisation.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

# Defaults tuned on 2 CPU cores (a few minutes). The digits
# are small, centred and grey: the augmentation is milder than the 32 px preset (no
# colour jitter, grey scale or flips, larger crops), which lets MSN learn in a few
# hundred steps.
DEMO_SETTINGS: dict[str, Any] = dict(
    model="vit_tiny_patch16_224",
    img_size=16,
    patch_size=4,
    focal_size=8,
    random_views=2,
    focal_views=2,
    epochs=60,
    batch_size=64,
    lr=3e-3,
    start_lr=2e-4,
    warmup_epochs=1.0,
    hidden_dim=256,
    output_dim=64,
    num_prototypes=64,
    vit_kwargs=dict(embed_dim=96, depth=4, num_heads=3),
    random_crop_scale=(0.6, 1.0),
    focal_crop_scale=(0.25, 0.5),
    cj_prob=0.0,
    random_gray_scale=0.0,
    hf_prob=0.0,
)
KNN_K = 20


@dataclass
class DemoResult:
    """kNN top-1 accuracies (percent) of the demo."""

    msn_accuracy: float
    random_accuracy: float
    seconds: float

    @property
    def margin(self) -> float:
        return self.msn_accuracy - self.random_accuracy


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``lightly-msn demo``; prints both accuracies."""
    settings = dict(DEMO_SETTINGS)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    result = demo(output_dir=args.output_dir, seed=args.seed, **settings)
    print(f"kNN (k={KNN_K}) top-1 accuracy on the digits test set:")
    print(f"  ViT at random initialisation: {result.random_accuracy:5.1f} %")
    print(f"  ViT pretrained with MSN:      {result.msn_accuracy:5.1f} %")
    print(
        f"  MSN - random init:            {result.margin:+5.1f} points "
        f"({result.seconds:.0f} s)"
    )
    return 0


def demo(
    output_dir: str | Path = "runs/demo",
    seed: int = 0,
    progress: bool = True,
    **settings: Any,
) -> DemoResult:
    """Pretrains on the digits and returns the kNN accuracies (see ``run_demo``)."""
    from pytorch_lightning import seed_everything

    from lightly_msn.data import CIFAR10_NORMALIZE, build_dataset, eval_transform
    from lightly_msn.model import ClassTokenFeatures, create_vit
    from lightly_msn.train import pretrain

    start = time.perf_counter()
    # before the ViT is created: torch seeds its default generator at random per
    # process, so an unseeded initialisation made every run of a seed different
    seed_everything(seed, verbose=False)
    settings = {**DEMO_SETTINGS, **settings}
    model = create_vit(
        settings.pop("model"),
        img_size=settings["img_size"],
        patch_size=settings["patch_size"],
        **settings.pop("vit_kwargs"),
    )
    random_init = ClassTokenFeatures(create_vit_like(model)).eval()
    result = pretrain(
        dataset="digits",
        vit=model,
        output_dir=output_dir,
        overwrite=True,
        seed=seed,
        num_workers=0,
        accelerator="cpu",
        devices=1,
        progress=progress,
        **settings,
    )
    pretrained = ClassTokenFeatures(result.module.model.target_vit).eval()

    to_tensor = eval_transform(settings["img_size"], CIFAR10_NORMALIZE)
    train = build_dataset(
        "digits", "train", transform=to_tensor, img_size=settings["img_size"]
    )
    test = build_dataset(
        "digits", "test", transform=to_tensor, img_size=settings["img_size"]
    )
    return DemoResult(
        msn_accuracy=knn_accuracy(pretrained, train, test, progress),
        random_accuracy=knn_accuracy(random_init, train, test, progress),
        seconds=time.perf_counter() - start,
    )


def create_vit_like(vit: VisionTransformer) -> VisionTransformer:
    """A copy of ``vit`` with freshly initialised weights."""
    import copy

    fresh = copy.deepcopy(vit)
    fresh.init_weights()
    return fresh


def knn_accuracy(
    backbone: nn.Module, train: Any, test: Any, progress: bool = True
) -> float:
    """kNN top-1 accuracy (percent) of ``backbone``'s features."""
    from lightly_msn.eval import KNNClassifier, embed

    train_features, train_labels = embed(
        backbone, train, device="cpu", progress=progress
    )
    test_features, test_labels = embed(backbone, test, device="cpu", progress=progress)
    classifier = KNNClassifier(ks=(KNN_K,)).fit(train_features, train_labels)
    return classifier.score(test_features, test_labels)[f"knn_top1@{KNN_K}"]
