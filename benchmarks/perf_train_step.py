"""Throughput of one MSN training step: lightly_msn versus lightly's own MSN recipe.

Both sides train the same ViT (32 px images, patch 4, dim 192, depth 6, 3 heads) on
the same views per image (1 target, 1 masked random anchor, 4 focal views of 16 px),
batch 64, random tensors, with a 2048-256 projection head and 1024 prototypes.

- lightly: the composition of lightly's ``examples/pytorch/msn.py`` on timm
  (``MaskedVisionTransformerTIMM``, ``MSNProjectionHead``, ``MSNLoss``,
  ``update_momentum``, AdamW), with mask ratio 0.15 on the anchor and focal views.
- ours: ``MSNLightningModule``'s step (``lightly_msn.model.MSN`` + ``MSNLoss``,
  official optimizer groups, gradient clipping, EMA), the focal views unmasked as
  in the official code.

Reported per configuration, as medians over interleaved repeats in one run: step
time, images/s, the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``),
GFLOP/s and MFU against the same-run fp32 matmul peak. On CPU it also prints the
throughput of the encoder's fp32 linear layers through MKL (torch's choice) and
through oneDNN, for reference, and with ``--onednn-linear`` one more configuration:
ours in fp32 with every linear layer computed by oneDNN (a measurement of what that
library would give, through a private operator; the package does not do this).

Usage::

    python benchmarks/perf_train_step.py [--repeats 5] [--threads N] [--onednn-linear]
    python benchmarks/perf_train_step.py --device cuda --batch-size 256  # GPU check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import timm
import torch
from lightly.loss import MSNLoss as LightlyMSNLoss
from lightly.models import utils as lightly_utils
from lightly.models.modules import MaskedVisionTransformerTIMM
from lightly.models.modules.heads import MSNProjectionHead as LightlyHead
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightly_msn.train import MSNLightningModule

BATCH_SIZE = 64
CPU = torch.device("cpu")
IMG_SIZE = 32
FOCAL_SIZE = 16
NUM_FOCAL = 4
VIT_KWARGS = dict(
    img_size=IMG_SIZE,
    patch_size=4,
    embed_dim=192,
    depth=6,
    num_heads=3,
    num_classes=0,
    dynamic_img_size=True,
)


def make_views(batch_size: int, device: torch.device) -> list[Tensor]:
    sizes = [IMG_SIZE] * 2 + [FOCAL_SIZE] * NUM_FOCAL
    return [torch.randn(batch_size, 3, size, size, device=device) for size in sizes]


class LightlyRecipe(nn.Module):
    """lightly's ``examples/pytorch/msn.py`` model, on a timm ViT."""

    def __init__(self) -> None:
        super().__init__()
        vit = timm.create_model("vit_tiny_patch16_224", **VIT_KWARGS)
        self.mask_ratio = 0.15
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.projection_head = LightlyHead(input_dim=192)
        self.anchor_backbone = copy.deepcopy(self.backbone)
        self.anchor_projection_head = copy.deepcopy(self.projection_head)
        lightly_utils.deactivate_requires_grad(self.backbone)
        lightly_utils.deactivate_requires_grad(self.projection_head)
        self.prototypes = nn.Linear(256, 1024, bias=False).weight

    def forward_masked(self, images: Tensor) -> Tensor:
        batch_size, _, _, width = images.shape
        patch_size = self.anchor_backbone.vit.patch_embed.patch_size[0]
        seq_length = (width // patch_size) ** 2
        idx_keep, _ = lightly_utils.random_token_mask(
            size=(batch_size, seq_length),
            mask_ratio=self.mask_ratio,
            device=images.device,
        )
        out = self.anchor_backbone(images=images, idx_keep=idx_keep)
        return self.anchor_projection_head(out)  # type: ignore[no-any-return]


def lightly_step_fn(
    precision: str, device: torch.device
) -> Callable[[list[Tensor]], float]:
    torch.manual_seed(0)
    model = LightlyRecipe().to(device)
    criterion = LightlyMSNLoss()
    params = [
        *model.anchor_backbone.parameters(),
        *model.anchor_projection_head.parameters(),
        model.prototypes,
    ]
    optimizer = torch.optim.AdamW(params, lr=1.5e-4)

    def step(views: list[Tensor]) -> float:
        lightly_utils.update_momentum(model.anchor_backbone, model.backbone, 0.996)
        lightly_utils.update_momentum(
            model.anchor_projection_head, model.projection_head, 0.996
        )
        with autocast(precision, device):
            targets = model.projection_head(model.backbone(views[0]))
            anchors = model.forward_masked(views[1])
            focal = model.forward_masked(torch.cat(views[2:]))
            loss = criterion(
                torch.cat([anchors, focal]), targets, model.prototypes.data
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def ours_step_fn(
    precision: str, device: torch.device, onednn_linear: bool = False
) -> Callable[[list[Tensor]], float]:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **VIT_KWARGS)
    module = MSNLightningModule(model=vit, mask_ratio=0.15, max_steps=1000)
    module.to(device)
    if onednn_linear:
        for linear in module.modules():
            if type(linear) is nn.Linear:
                linear.__class__ = OneDNNLinear
    optimizer = module.configure_optimizers()
    iteration = 0

    def step(views: list[Tensor]) -> float:
        # what Lightning runs per batch: training_step, backward, the clipping
        # hook, the optimizer step, then the EMA update of on_train_batch_end
        nonlocal iteration
        with autocast(precision, device):
            output = module.compute_loss(views, iteration)
        output.loss.backward()
        module.clip_anchor_gradients()
        optimizer.step()
        optimizer.zero_grad()
        module.model.update_target(module.schedule_values(iteration)["momentum"])
        iteration += 1
        if output.loss.dtype != torch.float32 or not torch.isfinite(output.loss):
            raise RuntimeError("the MSN loss must be finite float32")
        return output.loss.item()

    return step


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    function: Callable[[], object],
    repeats: int,
    device: torch.device = CPU,
    warmup: int = 1,
) -> float:
    """Median wall time of ``4 * repeats`` synchronised calls, after ``warmup``."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats * 4):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops(repeats: int, device: torch.device) -> float:
    """fp32 GFLOP/s of a matmul the size of the ViT's MLP matmuls (larger on GPU)."""
    rows, dim = (4096, 768) if device.type == "cpu" else (65536, 4096)
    a = torch.randn(rows, dim, device=device)
    b = torch.randn(dim, dim, device=device)
    seconds = median_seconds(partial(torch.mm, a, b), repeats, device, warmup=3)
    return 2 * rows * dim * dim / seconds / 1e9


# the (tokens, in) -> out shapes of the anchor encoder's linear layers at batch 64
LINEAR_SHAPES = ((7872, 192, 576), (7872, 192, 192), (7872, 192, 768), (7872, 768, 192))


def linear_backends_table(repeats: int) -> list[str]:
    """fp32 ``F.linear`` (MKL on CPU) against oneDNN's linear on the ViT's shapes.

    torch sends fp32 CPU matmuls to MKL; oneDNN is reachable only through the
    private ``torch.ops.mkldnn._linear_pointwise`` (inductor's), so it is measured
    here as a reference for the MFU figures, not used by the package.
    """
    rows = ["| linear (tokens x in -> out) | F.linear GFLOP/s | oneDNN GFLOP/s |"]
    rows.append("|---|---|---|")
    for tokens, fan_in, fan_out in LINEAR_SHAPES:
        args = (torch.randn(tokens, fan_in), torch.randn(fan_out, fan_in))
        bias = torch.randn(fan_out)
        flops = 2 * tokens * fan_in * fan_out
        mkl = median_seconds(partial(F.linear, *args, bias), repeats)
        onednn = median_seconds(
            partial(torch.ops.mkldnn._linear_pointwise, *args, bias, "none", [], ""),
            repeats,
        )
        rows.append(
            f"| {tokens} x {fan_in} -> {fan_out} | {flops / mkl / 1e9:.0f} | "
            f"{flops / onednn / 1e9:.0f} |"
        )
    return rows


class _OneDNNLinearFunction(torch.autograd.Function):
    """fp32 linear whose forward and input gradient run in oneDNN; the weight
    gradient stays with MKL, which is fast for that product's layout here."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, inputs: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1]).contiguous()
        ctx.save_for_backward(rows, weight)
        ctx.input_shape, ctx.has_bias = inputs.shape, bias is not None
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return out.reshape(*inputs.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_input = torch.ops.mkldnn._linear_pointwise(
            grad_rows, weight.t().contiguous(), None, "none", [], ""
        ).reshape(ctx.input_shape)
        grad_bias = grad_rows.sum(0) if ctx.has_bias else None
        return grad_input, grad_rows.t() @ rows, grad_bias


class OneDNNLinear(nn.Linear):
    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
            return _OneDNNLinearFunction.apply(inputs, self.weight, self.bias)  # type: ignore[no-any-return]
        return F.linear(inputs, self.weight, self.bias)


def step_flops(step: Callable[[list[Tensor]], float], views: list[Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step(views)
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--onednn-linear",
        action="store_true",
        help="also time ours in fp32 with oneDNN linear layers (CPU only)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_size = args.batch_size

    views = make_views(batch_size, device)
    configs = {
        "lightly fp32": lightly_step_fn("32-true", device),
        "ours fp32": ours_step_fn("32-true", device),
        "lightly bf16-mixed": lightly_step_fn("bf16-mixed", device),
        "ours bf16-mixed": ours_step_fn("bf16-mixed", device),
    }
    flops = {name: step_flops(step, views) for name, step in configs.items()}
    if args.onednn_linear and device.type == "cpu":
        configs["ours fp32, oneDNN linear"] = ours_step_fn(
            "32-true", device, onednn_linear=True
        )
        # FlopCounterMode does not see the private oneDNN operator: same math
        flops["ours fp32, oneDNN linear"] = flops["ours fp32"]
    for step in configs.values():  # warm-up
        step(views)
    times: dict[str, list[float]] = {name: [] for name in configs}
    losses: dict[str, float] = {}
    peaks = []
    for _ in range(args.repeats):
        peaks.append(matmul_peak_gflops(1, device))
        for name, step in configs.items():
            start = time.perf_counter()
            losses[name] = step(views)
            times[name].append(time.perf_counter() - start)
    peak = statistics.median(peaks)

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(f"torch {torch.__version__}, {where}, batch {batch_size}")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s (median of {args.repeats})")
    baseline = batch_size / statistics.median(times["lightly fp32"])
    header = (
        "| config | step ms | img/s | x lightly fp32 | GFLOP/step | GFLOP/s | "
        "MFU (fp32 peak) | loss |"
    )
    print(header)
    print("|---" * 8 + "|")
    for name in configs:
        seconds = statistics.median(times[name])
        throughput = batch_size / seconds
        gflops = flops[name] / 1e9
        print(
            f"| {name} | {seconds * 1e3:.0f} | {throughput:.1f} | "
            f"{throughput / baseline:.2f} | {gflops:.1f} | {gflops / seconds:.1f} | "
            f"{gflops / seconds / peak:.0%} | {losses[name]:.3f} |"
        )
    if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        print("\nfp32 linear layers, MKL (what torch uses) against oneDNN:")
        print("\n".join(linear_backends_table(args.repeats)))


if __name__ == "__main__":
    main()
