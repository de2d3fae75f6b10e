"""One-off GPU profile of one training step, ours against lightly's recipe.

Batch 256, bf16-mixed and fp32: CUDA kernels, launches and ATen calls per step, GPU
busy time, and the most frequent ATen ops. Run from the repo root::

    python benchmarks/results/gpu-check-h200/profile_step.py
"""

import torch
from torch.profiler import ProfilerActivity, profile

import benchmarks.perf_train_step as recipe

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
device = torch.device("cuda")
views = recipe.make_views(256, device)
for precision in ("bf16-mixed", "32-true"):
    for name, make_step in (
        ("lightly", recipe.lightly_step_fn),
        ("ours", recipe.ours_step_fn),
    ):
        step = make_step(precision, device)
        for _ in range(5):
            step(views)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(views)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = [e for e in events if e.device_type.name == "CUDA"]
        aten = [e for e in events if e.key.startswith("aten::")]
        kernels = sum(e.count for e in gpu) / 3
        launches = sum(e.count for e in events if e.key in LAUNCHES) / 3
        busy = sum(e.self_device_time_total for e in gpu) / 3 / 1e3
        calls = sum(e.count for e in aten) / 3
        print(
            f"== {name} {precision}: {kernels:.0f} kernels/step, {launches:.0f} "
            f"launches/step, {calls:.0f} aten calls/step, GPU busy {busy:.1f} ms/step"
        )
        frequent = sorted(aten, key=lambda e: -e.count)[:25]
        print(
            "   most frequent aten ops per step: "
            + ", ".join(f"{e.key[6:]} {e.count / 3:.0f}" for e in frequent)
        )
        top = sorted(gpu, key=lambda e: -e.self_device_time_total)[:8]
        print(
            "   top kernels: "
            + "; ".join(
                f"{e.key[:50]} {e.self_device_time_total / 3 / 1e3:.2f}ms "
                f"x{e.count / 3:.0f}"
                for e in top
            )
        )
