"""Two CPU processes (gloo) holding halves of a batch must reproduce the whole batch."""

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightly.loss import MSNLoss as LightlyMSNLoss
from torch import Tensor

from lightly_msn.loss import MSNLoss, sinkhorn
from lightly_msn.pmsn_loss import PMSNLoss

WORLD_SIZE = 2
VIEWS = 3
BATCH_SIZE = 8  # global, split evenly over the ranks


def rank_slice(anchors: Tensor, targets: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The rows a rank holds: its targets and, for every view, their anchors."""
    per_rank = BATCH_SIZE // WORLD_SIZE
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    local_anchors = anchors.view(VIEWS, BATCH_SIZE, -1)[:, rows].reshape(
        VIEWS * per_rank, -1
    )
    return local_anchors, targets[rows]


def worker(
    rank: int,
    port: int,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor],
    out_dir: str,
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
    )
    try:
        anchors, targets, prototypes, probabilities = inputs
        local_anchors, local_targets = rank_slice(anchors, targets, rank)
        local_anchors.requires_grad_()
        prototypes = prototypes.clone().requires_grad_()
        loss = MSNLoss(gather_distributed=True)(
            local_anchors, local_targets, prototypes
        )
        loss.backward()
        lightly_loss = LightlyMSNLoss(gather_distributed=True)(
            local_anchors.detach(), local_targets, prototypes.detach()
        )
        # an overridden regularization_loss hook on the all-reduced mean prediction
        pmsn_anchors = local_anchors.detach().clone().requires_grad_()
        pmsn_prototypes = prototypes.detach().clone().requires_grad_()
        pmsn_loss = PMSNLoss(gather_distributed=True)(
            pmsn_anchors, local_targets, pmsn_prototypes
        )
        pmsn_loss.backward()
        per_rank = BATCH_SIZE // WORLD_SIZE
        local_probabilities = probabilities[rank * per_rank : (rank + 1) * per_rank]
        torch.save(
            {
                "loss": loss.detach(),
                "grad_anchors": local_anchors.grad,
                "grad_prototypes": prototypes.grad,
                "lightly_loss": lightly_loss,
                "pmsn_loss": pmsn_loss.detach(),
                "pmsn_grad_anchors": pmsn_anchors.grad,
                "pmsn_grad_prototypes": pmsn_prototypes.grad,
                "sinkhorn": sinkhorn(local_probabilities, gather_distributed=True),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        # both ranks reach the teardown together: with torch 2.4 a rank could hang
        # in destroy_process_group when the other one had already left
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(VIEWS * BATCH_SIZE, 16, generator=generator),
        torch.randn(BATCH_SIZE, 16, generator=generator),
        torch.randn(32, 16, generator=generator),
        torch.softmax(torch.randn(BATCH_SIZE, 32, generator=generator) * 3, dim=1),
    )
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(
        worker,
        args=(free_port(), inputs, str(out_dir)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    return {"inputs": inputs, "ranks": results}


def test_mean_rank_loss_and_ddp_averaged_gradients_equal_single_process(
    two_rank_run: dict,
) -> None:
    anchors, targets, prototypes, _ = two_rank_run["inputs"]
    ranks = two_rank_run["ranks"]
    anchors = anchors.clone().requires_grad_()
    prototypes = prototypes.clone().requires_grad_()
    loss = MSNLoss()(anchors, targets, prototypes)
    loss.backward()
    assert anchors.grad is not None and prototypes.grad is not None

    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    # DDP divides the summed parameter gradients by the world size
    ddp_grad_prototypes = sum(r["grad_prototypes"] for r in ranks) / WORLD_SIZE
    torch.testing.assert_close(ddp_grad_prototypes, prototypes.grad)
    # so a rank's activation gradient is world_size times the global one
    for rank, result in enumerate(ranks):
        expected, _ = rank_slice(anchors.grad, targets, rank)
        torch.testing.assert_close(result["grad_anchors"] / WORLD_SIZE, expected)


def test_lightly_per_rank_me_max_differs_from_single_process(
    two_rank_run: dict,
) -> None:
    anchors, targets, prototypes, _ = two_rank_run["inputs"]
    single = LightlyMSNLoss()(anchors, targets, prototypes)
    mean_lightly = torch.stack([r["lightly_loss"] for r in two_rank_run["ranks"]])
    assert abs(mean_lightly.mean() - single) > 1e-3


def test_sinkhorn_normalises_over_the_global_batch(two_rank_run: dict) -> None:
    probabilities = two_rank_run["inputs"][3]
    gathered = torch.cat([r["sinkhorn"] for r in two_rank_run["ranks"]])
    torch.testing.assert_close(gathered, sinkhorn(probabilities))


def test_overridden_hook_sees_the_global_mean_prediction(two_rank_run: dict) -> None:
    anchors, targets, prototypes, _ = two_rank_run["inputs"]
    ranks = two_rank_run["ranks"]
    anchors = anchors.clone().requires_grad_()
    prototypes = prototypes.clone().requires_grad_()
    loss = PMSNLoss()(anchors, targets, prototypes)
    loss.backward()
    assert anchors.grad is not None and prototypes.grad is not None

    mean_loss = torch.stack([r["pmsn_loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    ddp_grad_prototypes = sum(r["pmsn_grad_prototypes"] for r in ranks) / WORLD_SIZE
    torch.testing.assert_close(ddp_grad_prototypes, prototypes.grad)
    for rank, result in enumerate(ranks):
        expected, _ = rank_slice(anchors.grad, targets, rank)
        torch.testing.assert_close(result["pmsn_grad_anchors"] / WORLD_SIZE, expected)
