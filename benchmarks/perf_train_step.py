"""Throughput of one MSN training step: lightly_msn versus lightly's own MSN recipe.

Both sides train the same ViT (32 px images, patch 4, dim 192, depth 6, 3 heads) on
the same views per image (1 target, 1 masked random anchor, 4 focal views of 16 px),
batch 64, random tensors, with a 2048-256 projection head and 1024 prototypes, and
both are trained by a ``pytorch_lightning.Trainer`` with the package's run-directory
arguments (``lightly_msn.train.run_trainer_arguments``: the same attention kernel
choice under CPU bf16, the same logger), so a step is what ``lightly-msn pretrain``
and the benchmarks run:

- lightly: the benchmark harness's ``msn_lightly`` method, the composition of
  lightly's ``examples/pytorch/msn.py`` on timm (``MaskedVisionTransformerTIMM``,
  ``MSNProjectionHead``, ``MSNLoss``, ``update_momentum``, AdamW), with mask ratio
  0.15 on the anchor and focal views.
- ours: ``MSNLightningModule`` (``lightly_msn.model.MSN`` + ``MSNLoss``, official
  optimizer groups, gradient clipping, EMA), the focal views unmasked as in the
  official code; also with the class-token shortcut of the last block switched off
  (``fast_class_token=False``), to measure what that code buys.

Each round fits every configuration for a few steps on a fresh trainer and times
the steps after the first (``on_train_batch_start`` to ``on_train_batch_end``,
synchronised); rounds interleave the configurations, and the table reports medians:
step time, images/s, the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``),
GFLOP/s and MFU against the same-run fp32 matmul peak. On CPU it also prints the
throughput of the encoder's fp32 linear layers through MKL (torch's choice) and
through oneDNN, for reference, and with ``--onednn-linear`` one more configuration:
ours in fp32 with every linear layer computed by oneDNN (a measurement of what that
library would give, through a private operator; the package does not do this).

Usage::

    python -m benchmarks.perf_train_step [--repeats 5] [--threads N] [--onednn-linear]
    python -m benchmarks.perf_train_step --device cuda --batch-size 256  # GPU check
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.methods.base import BenchmarkConfig
from benchmarks.methods.msn_lightly import MSNLightly
from lightly_msn.model import create_vit
from lightly_msn.train import MSNLightningModule, run_trainer_arguments

BATCH_SIZE = 64
CPU = torch.device("cpu")
IMG_SIZE = 32
FOCAL_SIZE = 16
NUM_FOCAL = 4
VIT: dict[str, Any] = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3)
STEPS_PER_ROUND = 3  # the first step of each fit is a warm-up and is not timed


class FixedViews(Dataset):
    """The same batch of random views, ``length`` times (no loader work).

    ``sizes``: the side of each view (default: 2 of 32 px, 4 of 16 px).
    """

    def __init__(
        self, batch_size: int, length: int, sizes: list[int] | None = None
    ) -> None:
        sizes = sizes or [IMG_SIZE] * 2 + [FOCAL_SIZE] * NUM_FOCAL
        self.views = [torch.randn(batch_size, 3, size, size) for size in sizes]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[list[Tensor], Tensor]:
        return self.views, torch.zeros(len(self.views[0]))


class StepTimer(Callback):
    """Wall time of each training step (forward, backward, optimizer, EMA)."""

    def __init__(self, float32_loss: bool) -> None:
        self.float32_loss = float32_loss
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        synchronize(trainer.strategy.root_device)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, module: LightningModule, outputs: Any, *args: Any
    ) -> None:
        synchronize(trainer.strategy.root_device)
        self.seconds.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss}")
        if self.float32_loss and loss.dtype != torch.float32:
            raise RuntimeError(f"our MSN loss must be float32, got {loss.dtype}")
        self.losses.append(float(loss))


def lightly_module(batch_size: int) -> LightningModule:
    torch.manual_seed(0)
    config = BenchmarkConfig(
        trainer={"max_epochs": 1},
        data={
            "img_size": IMG_SIZE,
            "focal_size": FOCAL_SIZE,
            "focal_views": NUM_FOCAL,
            "batch_size": batch_size,
        },
        vit=dict(VIT),
    )
    return MSNLightly(config)


def ours_module(fast_class_token: bool = True, onednn_linear: bool = False) -> Any:
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", img_size=IMG_SIZE, **VIT)
    module = MSNLightningModule(
        vit=vit, mask_ratio=0.15, max_steps=1000, fast_class_token=fast_class_token
    )
    if onednn_linear:
        for linear in module.modules():
            if type(linear) is nn.Linear:
                linear.__class__ = OneDNNLinear
    return module


def fit_steps(
    module: LightningModule,
    precision: str,
    device: torch.device,
    batch_size: int,
    steps: int,
    callbacks: list[Callback],
    datamodule: LightningDataModule | None = None,
    sizes: list[int] | None = None,
) -> None:
    """Trains ``module`` for ``steps`` steps with the package's trainer arguments.

    On ``datamodule``'s data, or by default on :class:`FixedViews` of ``sizes``.
    """
    with tempfile.TemporaryDirectory() as run_dir:
        arguments = run_trainer_arguments(
            run_dir, checkpoint_every_n_epochs=None, progress=False
        )
        arguments["callbacks"] += callbacks
        trainer = Trainer(
            max_steps=steps,
            accelerator=device.type,
            devices=1,
            precision=precision,  # type: ignore[arg-type]
            enable_model_summary=False,
            log_every_n_steps=1,
            **arguments,
        )
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule)
            return
        loader = DataLoader(
            FixedViews(batch_size, steps, sizes), batch_size=None, collate_fn=None
        )
        trainer.fit(module, loader)


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
    def forward(
        ctx: Any, inputs: Tensor, weight: Tensor, bias: Tensor | None
    ) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1]).contiguous()
        ctx.save_for_backward(rows, weight)
        ctx.input_shape, ctx.has_bias = inputs.shape, bias is not None
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return out.reshape(*inputs.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
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
            return _OneDNNLinearFunction.apply(inputs, self.weight, self.bias)
        return F.linear(inputs, self.weight, self.bias)


def step_flops(
    module: LightningModule, precision: str, device: torch.device, batch_size: int
) -> int:
    """FLOPs of one training step (matrix products, as ``FlopCounterMode`` counts)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fit_steps(module, precision, device, batch_size, 1, [])
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--precisions",
        default="32-true,bf16-mixed",
        help="comma separated Lightning precisions (bf16 needs native bf16 matrix "
        "instructions on a CPU: AVX-512-BF16 or AMX)",
    )
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

    builders: dict[str, tuple[Callable[[], LightningModule], str]] = {}
    for precision in args.precisions.split(","):
        short = "fp32" if precision == "32-true" else precision
        builders[f"lightly {short}"] = (partial(lightly_module, batch_size), precision)
        builders[f"ours {short}"] = (ours_module, precision)
        builders[f"ours {short}, full last block"] = (
            partial(ours_module, fast_class_token=False),
            precision,
        )
    if args.onednn_linear and device.type == "cpu":
        builders["ours fp32, oneDNN linear"] = (
            partial(ours_module, onednn_linear=True),
            "32-true",
        )
    modules = {name: build() for name, (build, _) in builders.items()}
    precisions = {name: precision for name, (_, precision) in builders.items()}
    flops = {
        name: step_flops(build(), precisions[name], device, batch_size)
        for name, (build, _) in builders.items()
        if "oneDNN" not in name
    }
    if "ours fp32, oneDNN linear" in builders:
        # FlopCounterMode does not see the private oneDNN operator: same math
        flops["ours fp32, oneDNN linear"] = flops["ours fp32"]

    times: dict[str, list[float]] = {name: [] for name in modules}
    losses: dict[str, float] = {}
    peaks = []
    for _ in range(args.repeats):
        peaks.append(matmul_peak_gflops(1, device))
        for name, module in modules.items():
            timer = StepTimer(float32_loss=name.startswith("ours"))
            fit_steps(
                module, precisions[name], device, batch_size, STEPS_PER_ROUND, [timer]
            )
            times[name] += timer.seconds[1:]
            losses[name] = timer.losses[-1]
    peak = statistics.median(peaks)

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    print(f"torch {torch.__version__}, {where}, batch {batch_size}")
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s (median of {args.repeats})")
    baseline_name = next(name for name in modules if name.startswith("lightly"))
    baseline = batch_size / statistics.median(times[baseline_name])
    header = (
        f"| config | step ms | img/s | x {baseline_name} | GFLOP/step | GFLOP/s | "
        "MFU (fp32 peak) | loss |"
    )
    print(header)
    print("|---" * 8 + "|")
    for name in modules:
        seconds = statistics.median(times[name])
        throughput = batch_size / seconds
        gflops = flops[name] / 1e9
        print(
            f"| {name} | {seconds * 1e3:.0f} | {throughput:.1f} | "
            f"{throughput / baseline:.2f} | {gflops:.1f} | {gflops / seconds:.1f} | "
            f"{gflops / seconds / peak:.0%} | {losses[name]:.3f} |"
        )
    for short in [name[len("ours ") :] for name in modules if name.endswith("block")]:
        short = short.removesuffix(", full last block")
        fast = statistics.median(times[f"ours {short}"])
        full = statistics.median(times[f"ours {short}, full last block"])
        print(f"class-token shortcut, {short}: step {full / fast:.3f}x faster with it")
    if device.type == "cpu" and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        print("\nfp32 linear layers, MKL (what torch uses) against oneDNN:")
        print("\n".join(linear_backends_table(args.repeats)))


if __name__ == "__main__":
    main()
