"""The CUDA paths: same results as on the CPU, tensors on the right device.

Skipped without a GPU (CI runs on CPU); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``.
"""

import pytest
import torch
from lightly.models.utils import update_momentum as lightly_update_momentum
from torch import nn
from torch.utils.data import TensorDataset

from lightly_msn.ema import update_momentum
from lightly_msn.eval.embed import embed
from lightly_msn.eval.fewshot import fit_logistic_regression
from lightly_msn.loss import MSNLoss
from lightly_msn.masking import focal_token_mask, random_token_mask
from tests._train_helpers import tiny_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def loss_inputs(device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(8 * 3, 16), (8, 16), (12, 16)]  # anchors, targets, prototypes
    return [
        torch.randn(shape, generator=generator).to(device).requires_grad_()
        for shape in shapes
    ]


def test_loss_and_gradients_on_cuda_equal_the_cpu() -> None:
    results = {}
    for device in (torch.device("cpu"), CUDA):
        anchors, targets, prototypes = loss_inputs(device)
        output = MSNLoss(gather_distributed=False).compute(anchors, targets, prototypes)
        output.loss.backward()
        assert output.loss.device.type == device.type
        assert anchors.grad is not None and prototypes.grad is not None
        results[device.type] = [
            output.loss.detach().cpu(),
            anchors.grad.cpu(),
            prototypes.grad.cpu(),
        ]
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-4, atol=1e-6)


def test_loss_under_bf16_autocast_on_cuda_is_float32_and_finite() -> None:
    anchors, targets, prototypes = loss_inputs(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = MSNLoss(temperature=0.025)(anchors, targets, prototypes)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert anchors.grad is not None and torch.isfinite(anchors.grad).all()


def test_loss_rejects_non_finite_cuda_inputs() -> None:
    anchors, targets, prototypes = loss_inputs(CUDA)
    with torch.no_grad():
        targets[3, 5] = float("nan")
    with pytest.raises(ValueError, match="targets"):
        MSNLoss()(anchors, targets, prototypes)


def test_masks_are_created_on_the_cuda_device() -> None:
    idx_keep, idx_mask = random_token_mask((4, 65), mask_ratio=0.15, device=CUDA)
    assert idx_keep.device.type == idx_mask.device.type == "cuda"
    assert idx_keep.shape == (4, 1 + 54)
    focal = focal_token_mask((4, 65), grid_size=(8, 8), block_size=(3, 3), device=CUDA)
    assert focal.device.type == "cuda"
    assert focal.shape == (4, 1 + 9)


def test_update_momentum_on_cuda_equals_lightly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(CUDA)
    ema, ema_lightly = (
        nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)).to(CUDA)
        for _ in range(2)
    )
    ema_lightly.load_state_dict(ema.state_dict())
    for _ in range(3):
        update_momentum(model, ema, 0.9)
        lightly_update_momentum(model, ema_lightly, 0.9)
    for ours, theirs in zip(ema.parameters(), ema_lightly.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_a_bf16_training_step_on_cuda_trains_anchor_and_prototypes() -> None:
    torch.manual_seed(0)
    module = tiny_module().to(CUDA)
    optimizer = module.configure_optimizers()
    views = [torch.randn(4, 3, 16, 16, device=CUDA) for _ in range(2)] + [
        torch.randn(4, 3, 8, 8, device=CUDA) for _ in range(2)
    ]
    before = {
        "anchor": module.model.vit.blocks[0].mlp.fc1.weight.detach().clone(),
        "target": module.model.target_vit.blocks[0].mlp.fc1.weight.detach().clone(),
        "prototypes": module.model.prototypes.weight.detach().clone(),
    }
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = module.compute_loss(views, step=0)
    output.loss.backward()
    module.clip_anchor_gradients()
    optimizer.step()
    module.model.update_target(0.5)
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    after = {
        "anchor": module.model.vit.blocks[0].mlp.fc1.weight,
        "target": module.model.target_vit.blocks[0].mlp.fc1.weight,
        "prototypes": module.model.prototypes.weight,
    }
    for name, value in before.items():
        assert not torch.equal(after[name], value), f"{name} did not change"
    assert module.model.target_vit.blocks[0].mlp.fc1.weight.grad is None


def test_embed_on_cuda_matches_the_cpu_within_bf16_precision() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32))
    images = torch.randn(20, 3, 8, 8)
    dataset = TensorDataset(images, torch.arange(20) % 4)
    on_cpu, labels_cpu = embed(model, dataset, batch_size=8, device="cpu")
    on_cuda, labels_cuda = embed(model, dataset, batch_size=8, device=CUDA)
    assert on_cuda.dtype == torch.float32 and on_cuda.device.type == "cpu"
    assert torch.equal(labels_cpu, labels_cuda)
    # bf16 autocast on CUDA: about 3 significant digits
    torch.testing.assert_close(on_cuda, on_cpu, rtol=2e-2, atol=2e-2)


def test_few_shot_fit_on_cuda_predicts_as_on_the_cpu() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 16, generator=generator)
    labels = torch.arange(50) % 5
    features = centres[labels] + torch.randn(50, 16, generator=generator)
    weights = {
        device: fit_logistic_regression(features.to(device), labels.to(device), 5)
        for device in ("cpu", "cuda")
    }
    assert weights["cuda"].device.type == "cuda"
    predictions = {
        device: (features.to(device) @ weight.T).argmax(dim=1).cpu()
        for device, weight in weights.items()
    }
    assert torch.equal(predictions["cuda"], predictions["cpu"])
