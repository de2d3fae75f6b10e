"""Speed, memory and numerical stability of lightly_msn's components versus lightly's.

Prints Markdown tables, all measured in one run:

1. ``MSNLoss`` forward + backward (B=256 targets, M=11 anchor views, K=1024
   prototypes, D=256): median time and peak extra memory, ours / lightly's.
2. ``update_momentum`` on a pair of timm ``vit_small_patch16_224``: median time, and
   in the same rounds a floor: a bare multi-tensor lerp over lists collected once.
3. Stability: for confident (clustered) inputs at loss temperatures 0.1, 0.05,
   0.03, 0.025 and for bfloat16 inputs, whether each loss is finite and its
   relative error against the paper's formula evaluated in float64.

Timings interleave the two implementations in every round and report the median
per-round ratio, so load from other processes affects both sides alike.

Peak extra memory is the highest amount of memory allocated above what was
allocated before the call (inputs, parameters) during forward + backward,
gradients included. On CUDA it comes from ``torch.cuda.max_memory_allocated``. On
CPU, where torch has no allocator statistics, it is replayed from the allocation
and free events that ``torch.profiler`` records with ``profile_memory=True``.

Usage::

    python benchmarks/perf_components.py [--repeats 15] [--threads N]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_SHAPE = {"batch_size": 256, "views": 11, "prototypes": 1024, "dim": 256}
STABILITY_TEMPERATURES = (0.1, 0.05, 0.03, 0.025)


# the settings of paper_loss_float64 and their defaults (MSNLoss's)
PAPER_LOSS_DEFAULTS = {
    "temperature": 0.1,
    "sharpen_temperature": 0.25,
    "sinkhorn_iterations": 3,
    "regularization_weight": 1.0,
    "entropy_weight": 0.0,
}


def paper_loss_float64(
    anchors: Tensor,
    targets: Tensor,
    prototypes: Tensor,
    prior: Tensor | None = None,
    **settings: float,
) -> Tensor:
    """The MSN objective of the paper, evaluated literally (powers, no log domain)
    in float64: cross-entropy to sharpened, Sinkhorn-normalised targets plus
    ``KL(mean prediction || prior)`` (ME-MAX for the uniform prior) plus the mean
    per-sample entropy. Differentiable with respect to anchors and prototypes.
    ``settings`` override :data:`PAPER_LOSS_DEFAULTS` by name."""
    unknown = sorted(set(settings) - set(PAPER_LOSS_DEFAULTS))
    if unknown:
        raise TypeError(f"paper_loss_float64: unknown settings {unknown}")
    values = {**PAPER_LOSS_DEFAULTS, **settings}
    temperature = values["temperature"]
    anchors, targets, prototypes = (
        F.normalize(x.double(), dim=1) for x in (anchors, targets, prototypes)
    )
    num_prototypes = prototypes.shape[0]
    num_views = anchors.shape[0] // targets.shape[0]
    predictions = torch.softmax(anchors @ prototypes.T / temperature, dim=1)
    with torch.no_grad():
        target_probs = torch.softmax(targets @ prototypes.T / temperature, dim=1)
        target_probs = target_probs ** (1 / values["sharpen_temperature"])
        target_probs = target_probs / target_probs.sum(dim=1, keepdim=True)
        for _ in range(int(values["sinkhorn_iterations"])):
            target_probs = target_probs / target_probs.sum(dim=0, keepdim=True)
            target_probs = target_probs / target_probs.sum(dim=1, keepdim=True)
    target_rows = torch.cat([target_probs] * num_views)
    cross_entropy = -(target_rows * predictions.log()).sum(dim=1).mean()
    mean_prediction = predictions.mean(dim=0)
    if prior is None:
        prior = torch.full((num_prototypes,), 1 / num_prototypes)
    kl = (mean_prediction * (mean_prediction / prior.double()).log()).sum()
    entropy = -(predictions * predictions.log()).sum(dim=1).mean()
    return (
        cross_entropy
        + values["regularization_weight"] * kl
        + values["entropy_weight"] * entropy
    )


def clustered_inputs(
    batch_size: int = 64,
    views: int = 4,
    prototypes: int = 128,
    dim: int = 32,
    seed: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Confident inputs: every embedding lies close to one of 8 prototypes, as
    late in training when the predictions have become sharp."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(prototypes, dim, generator=generator)
    cluster = torch.randint(8, (batch_size,), generator=generator)
    noise = 0.05
    targets = weights[cluster] + noise * torch.randn(
        batch_size, dim, generator=generator
    )
    anchors = torch.cat(
        [
            targets + noise * torch.randn(batch_size, dim, generator=generator)
            for _ in range(views)
        ]
    )
    return anchors, targets, weights


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    functions: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Runs every function once per round, ``repeats`` rounds, in seconds."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            _synchronize(device)
            start = time.perf_counter()
            function()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def peak_extra_memory_bytes(
    function: Callable[[], object], device: torch.device
) -> int:
    """Peak memory allocated by ``function`` above what was allocated before it."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = prof.profiler.kineto_results.events()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in events
        if event.name() == "[memory]" and event.device_type().name == "CPU"
    )
    current = peak = 0
    for _, nbytes in allocations:
        current += nbytes
        peak = max(peak, current)
    return peak


def round_ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of ``name``'s time / lightly's time in the same round."""
    return statistics.median(
        t / baseline for t, baseline in zip(times[name], times["lightly"], strict=True)
    )


def ratio_rows(times: dict[str, list[float]]) -> list[str]:
    """Median time and median per-round ratio, plus the best (minimum) times,
    which estimate the cost without interference from other processes."""
    ours, theirs = times["ours"], times["lightly"]
    ratio = round_ratio(times, "ours")
    best_ratio = min(ours) / min(theirs)
    return [
        f"| time, median of rounds | {statistics.median(theirs) * 1e3:.1f} ms | "
        f"{statistics.median(ours) * 1e3:.1f} ms | {ratio:.2f}x "
        f"({1 / ratio:.2f}x faster) |",
        f"| time, best round | {min(theirs) * 1e3:.1f} ms | {min(ours) * 1e3:.1f} ms "
        f"| {best_ratio:.2f}x ({1 / best_ratio:.2f}x faster) |",
    ]


def benchmark_loss(device: torch.device, repeats: int, warmup: int) -> list[str]:
    from lightly.loss import MSNLoss as LightlyMSNLoss

    from lightly_msn.loss import MSNLoss

    shape = LOSS_SHAPE
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(
        shape["batch_size"] * shape["views"], shape["dim"], generator=generator
    ).to(device)
    targets = torch.randn(shape["batch_size"], shape["dim"], generator=generator)
    targets = targets.to(device)
    prototypes = torch.randn(shape["prototypes"], shape["dim"], generator=generator)
    prototypes = prototypes.to(device)
    anchors.requires_grad_()
    prototypes.requires_grad_()

    def step(loss_fn: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            anchors.grad = None
            prototypes.grad = None
            loss_fn(anchors, targets, prototypes).backward()

        return run

    def matmuls() -> None:
        # the products both implementations must compute: logits, and the
        # gradients w.r.t. anchors and prototypes
        with torch.no_grad():
            logits = anchors @ prototypes.T
            logits @ prototypes
            logits.T @ anchors

    functions = {
        "lightly": step(LightlyMSNLoss()),
        "ours": step(MSNLoss()),
        "matmuls": matmuls,
    }
    times = interleaved_times(functions, repeats, warmup, device)
    memory = {
        name: statistics.median(
            peak_extra_memory_bytes(functions[name], device) for _ in range(3)
        )
        / 2**20
        for name in ("lightly", "ours")
    }
    memory_ratio = memory["ours"] / memory["lightly"]
    floor = statistics.median(times["matmuls"])
    return [
        "| MSNLoss fwd+bwd (B=256, M=11, K=1024, D=256) | lightly | ours | "
        "ours / lightly |",
        "|---|---|---|---|",
        *ratio_rows(times),
        f"| peak extra memory | {memory['lightly']:.1f} MiB | {memory['ours']:.1f} MiB "
        f"| {memory_ratio:.2f}x |",
        "",
        f"The three (B M x D x K) matrix products that both must compute took "
        f"{floor * 1e3:.1f} ms (median), {floor / statistics.median(times['ours']):.0%}"
        " of our median time.",
    ]


def benchmark_ema(device: torch.device, repeats: int, warmup: int) -> list[str]:
    import timm
    from lightly.models.utils import update_momentum as lightly_update_momentum

    from lightly_msn.ema import update_momentum

    model = timm.create_model("vit_small_patch16_224", num_classes=0).to(device)
    model_ema = timm.create_model("vit_small_patch16_224", num_classes=0).to(device)
    num_parameters = sum(p.numel() for p in model.parameters())
    # the floor of any update of these tensors, timed in the same rounds: one
    # multi-tensor lerp over lists collected beforehand, without the per-call
    # collection and checks that both implementations do
    with torch.no_grad():
        listed = [p.detach() for p in model.parameters()]
        ema_listed = [p.detach() for p in model_ema.parameters()]
    functions = {
        "lightly": lambda: lightly_update_momentum(model, model_ema, 0.996),
        "ours": lambda: update_momentum(model, model_ema, 0.996),
        "lists": lambda: torch._foreach_lerp_(ema_listed, listed, 0.004),
    }
    times = interleaved_times(functions, repeats, warmup, device)

    def speedup(name: str) -> float:
        return 1 / round_ratio(times, name)

    return [
        f"| update_momentum, ViT-S/16 pair ({num_parameters / 1e6:.1f} M parameters) "
        "| lightly | ours | ours / lightly |",
        "|---|---|---|---|",
        *ratio_rows(times),
        "",
        f"Floor in the same rounds: a bare torch._foreach_lerp_ over lists collected "
        f"beforehand took {statistics.median(times['lists']) * 1e3:.1f} ms (median), "
        f"{speedup('lists'):.2f}x faster than lightly (per-round median); "
        f"ours {speedup('ours'):.2f}x.",
    ]


def _relative_error(value: Tensor, reference: Tensor) -> str:
    if not torch.isfinite(value):
        return "-"
    error = abs(value.double().item() - reference.item()) / abs(reference.item())
    return f"{error:.1e}"


def _finite_with_gradients(
    loss_fn: Callable[..., Tensor], inputs: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, bool]:
    anchors, targets, prototypes = (x.detach().clone() for x in inputs)
    anchors.requires_grad_()
    prototypes.requires_grad_()
    loss = loss_fn(anchors, targets, prototypes)
    loss.backward()
    assert anchors.grad is not None and prototypes.grad is not None
    finite = bool(
        torch.isfinite(loss)
        & torch.isfinite(anchors.grad).all()
        & torch.isfinite(prototypes.grad).all()
    )
    return loss.detach(), finite


def stability_table() -> list[str]:
    from lightly.loss import MSNLoss as LightlyMSNLoss

    from lightly_msn.loss import MSNLoss

    def cast(
        inputs: tuple[Tensor, Tensor, Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        anchors, targets, prototypes = (x.to(dtype) for x in inputs)
        return anchors, targets, prototypes

    clustered = clustered_inputs()
    generator = torch.Generator().manual_seed(2)
    random_inputs = (
        torch.randn(256, 32, generator=generator),
        torch.randn(64, 32, generator=generator),
        torch.randn(128, 32, generator=generator),
    )
    cases = [
        (f"clustered, fp32, temperature {t}", t, clustered)
        for t in STABILITY_TEMPERATURES
    ]
    cases += [
        ("random, bf16, temperature 0.1", 0.1, cast(random_inputs, torch.bfloat16)),
        ("clustered, bf16, temperature 0.1", 0.1, cast(clustered, torch.bfloat16)),
        ("clustered, fp16, temperature 0.1", 0.1, cast(clustered, torch.float16)),
    ]

    rows = [
        "| inputs | lightly finite | lightly rel. error | ours finite | "
        "ours rel. error |",
        "|---|---|---|---|---|",
    ]
    for name, temperature, inputs in cases:
        reference = paper_loss_float64(*inputs, temperature=temperature)
        cells = []
        for loss_fn in (
            LightlyMSNLoss(temperature=temperature),
            MSNLoss(temperature=temperature),
        ):
            loss, finite = _finite_with_gradients(loss_fn, inputs)
            cells += ["yes" if finite else "**no**", _relative_error(loss, reference)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append(
        "finite = loss and gradients w.r.t. anchors and prototypes finite; "
        "rel. error of the loss against the float64 formula on the same (rounded) "
        "inputs."
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device: {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{args.repeats} repeats\n"
    )
    for table in (
        benchmark_loss(device, args.repeats, args.warmup),
        benchmark_ema(device, args.repeats, args.warmup),
        stability_table(),
    ):
        print("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
