"""One-off GPU probe of the loss and EMA (run on the H200 check, 2026-11-28).

Times each call with a synchronisation after every call, and 20 calls per
synchronisation (as in training, where the host runs ahead of the GPU), and our
loss with its input finiteness check (one host synchronisation) replaced by the
norms alone. Run from the repo root::

    python benchmarks/results/gpu-check-h200/probe.py
"""

import statistics
import time
from collections.abc import Callable

import timm
import torch
from lightly.loss import MSNLoss as LightlyMSNLoss
from lightly.models.utils import update_momentum as lightly_update_momentum
from torch.profiler import ProfilerActivity, profile

import lightly_msn.loss as ours_loss
from lightly_msn.ema import update_momentum

device = torch.device("cuda")
generator = torch.Generator().manual_seed(0)
anchors = torch.randn(256 * 11, 256, generator=generator).to(device).requires_grad_()
targets = torch.randn(256, 256, generator=generator).to(device)
prototypes = torch.randn(1024, 256, generator=generator).to(device).requires_grad_()
finite_norms = ours_loss._finite_norms


def norms_without_check(named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
            for x in named.values()
        ]


def loss_step(loss_fn: torch.nn.Module, check: bool = True) -> Callable[[], None]:
    def run() -> None:
        anchors.grad = prototypes.grad = None
        ours_loss._finite_norms = finite_norms if check else norms_without_check
        loss_fn(anchors, targets, prototypes).backward()
        ours_loss._finite_norms = finite_norms

    return run


def median_ms(function: Callable[[], object], calls: int, rounds: int = 15) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


theirs, ours = LightlyMSNLoss(), ours_loss.MSNLoss()
for calls in (1, 20):
    print(
        f"loss fwd+bwd, {calls} calls per sync: "
        f"lightly {median_ms(loss_step(theirs), calls):.3f} ms, "
        f"ours {median_ms(loss_step(ours), calls):.3f} ms, ours without finiteness "
        f"sync {median_ms(loss_step(ours, check=False), calls):.3f} ms"
    )
for name, function in (("lightly", loss_step(theirs)), ("ours", loss_step(ours))):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.device_time for e in kernels) / 1e3
    print(
        f"{name}: {len(kernels)} CUDA kernels per loss fwd+bwd, GPU busy {busy:.3f} ms"
    )

model = timm.create_model("vit_small_patch16_224", num_classes=0).to(device)
model_ema = timm.create_model("vit_small_patch16_224", num_classes=0).to(device)
for calls in (1, 20):
    lightly_ms = median_ms(
        lambda: lightly_update_momentum(model, model_ema, 0.996), calls
    )
    ours_ms = median_ms(lambda: update_momentum(model, model_ema, 0.996), calls)
    print(
        f"EMA ViT-S, {calls} calls per sync: lightly {lightly_ms:.3f} ms, "
        f"ours {ours_ms:.3f} ms, {lightly_ms / ours_ms:.2f}x"
    )
flat = torch.randn(sum(p.numel() for p in model.parameters()), device=device)
flat_ema = flat.clone()
floor = median_ms(lambda: flat_ema.lerp_(flat, 0.004), 20)
print(f"EMA bandwidth floor (one flat lerp_): {floor:.3f} ms")
