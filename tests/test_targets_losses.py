"""FCOS targets on hand-built boxes, loss ordering, KD loss values and gradient flow."""

from __future__ import annotations

import pytest
import torch

from msad_deploy.models import (
    FCOSOutputs,
    build_detector,
    build_teacher,
    compute_fcos_targets,
    fcos_losses,
    feature_distillation_loss,
)
from msad_deploy.models.pyramid import level_shapes, make_lr_batch, pyramid_levels
from msad_deploy.models.targets import BACKGROUND
from tests.conftest import tiny_model_config

SHAPES_256 = level_shapes(256, 256, pyramid_levels(0))  # 32, 16, 8, 4, 2


def _targets(boxes, labels, radius=1.5):
    return compute_fcos_targets(
        [torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)],
        [torch.tensor(labels, dtype=torch.long)],
        SHAPES_256,
        center_sampling_radius=radius,
    )


def test_small_box_gets_a_3x3_center_region_on_p3() -> None:
    targets = _targets([[0, 0, 40, 40]], [2])
    positive = (targets.labels[0] >= 0).nonzero().flatten()
    # P3 cells (stride 8) have centres 4, 12, 20, ...; the centre region is (20 +- 12) clipped to the box.
    expected = [row * 32 + col for row in (1, 2, 3) for col in (1, 2, 3)]
    assert positive.tolist() == expected
    assert (targets.labels[0, positive] == 2).all()
    centre = 2 * 32 + 2  # location (20, 20)
    torch.testing.assert_close(targets.box_targets[0, centre], torch.full((4,), 2.5))  # 20 px / stride 8
    torch.testing.assert_close(targets.centerness[0, centre], torch.tensor(1.0))
    corner = 1 * 32 + 1  # location (12, 12): l=t=12, r=b=28
    torch.testing.assert_close(targets.centerness[0, corner], torch.tensor(12 / 28))
    assert (targets.centerness[0, targets.labels[0] == BACKGROUND] == 0).all()


def test_large_box_goes_to_the_level_of_its_size() -> None:
    targets = _targets([[0, 0, 256, 256]], [1])  # max distance at the centre is 128: level P5 [128, 256)
    positive = (targets.labels[0] >= 0).nonzero().flatten()
    offsets = torch.cumsum(torch.tensor([0] + [h * w for h, w in SHAPES_256]), 0)
    levels = torch.bucketize(positive, offsets[1:], right=True)
    assert set(levels.tolist()) <= {2, 3} and 2 in levels.tolist()


def test_without_center_sampling_the_whole_box_is_positive() -> None:
    targets = _targets([[0, 0, 40, 40]], [0], radius=0.0)
    assert int((targets.labels[0] >= 0).sum()) == 25  # P3 centres 4..36 inside (0, 40): 5 x 5


def test_ambiguous_location_goes_to_the_smaller_box() -> None:
    targets = _targets([[0, 0, 48, 48], [0, 0, 40, 40]], [0, 3])
    centre = 2 * 32 + 2  # (20, 20) is in both centre regions on P3
    assert targets.labels[0, centre] == 3


def test_image_without_boxes_is_all_background() -> None:
    targets = compute_fcos_targets([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], SHAPES_256)
    assert (targets.labels == BACKGROUND).all() and targets.centerness.sum() == 0


def _perfect_outputs(targets, num_classes: int) -> FCOSOutputs:
    """Head outputs that reproduce ``targets`` exactly, reshaped per level."""
    labels, boxes, ctr = targets.labels[0], targets.box_targets[0], targets.centerness[0]
    cls = torch.full((len(labels), num_classes), -12.0)
    cls[labels >= 0, labels[labels >= 0]] = 12.0
    ctr_logits = torch.logit(ctr.clamp(1e-4, 1 - 1e-4))
    out = FCOSOutputs([], [], [])
    start = 0
    for h, w in SHAPES_256:
        end = start + h * w
        out.cls_logits.append(cls[start:end].T.reshape(1, num_classes, h, w))
        out.box_regression.append(boxes[start:end].T.reshape(1, 4, h, w))
        out.centerness.append(ctr_logits[start:end].reshape(1, 1, h, w))
        start = end
    return out


def test_perfect_prediction_has_lower_loss_than_perturbed() -> None:
    targets = _targets([[0, 0, 40, 40], [60, 80, 200, 220]], [1, 2])
    perfect = _perfect_outputs(targets, num_classes=4)
    perfect_losses = fcos_losses(perfect, targets)
    assert perfect_losses["loss_box"] < 1e-5
    perturbed = FCOSOutputs(
        [t + torch.randn_like(t) for t in perfect.cls_logits],
        [t * 1.3 + 0.2 for t in perfect.box_regression],
        [t + torch.randn_like(t) for t in perfect.centerness],
    )
    perturbed_losses = fcos_losses(perturbed, targets)
    for name in ("loss_cls", "loss_box", "loss_ctr"):
        assert perturbed_losses[name] > perfect_losses[name], name


def test_losses_reject_unaligned_outputs() -> None:
    targets = _targets([[0, 0, 40, 40]], [1])
    outputs = _perfect_outputs(targets, 4)
    outputs.cls_logits[0] = outputs.cls_logits[0][..., :16]
    with pytest.raises(ValueError, match="aligned"):
        fcos_losses(outputs, targets)


def test_feature_distillation_loss_values() -> None:
    student = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]
    teacher = [torch.full((1, 2, 4, 4), 3.0), torch.full((1, 2, 2, 2), 6.0)]
    # alpha * T^2 * mean|s/T - t/T| = 0.2 * 9 * (1 + 2)
    torch.testing.assert_close(feature_distillation_loss(student, teacher), torch.tensor(0.2 * 9 * 3))
    torch.testing.assert_close(
        feature_distillation_loss(student, teacher, kind="mse"), torch.tensor(0.2 * 9 * 5)
    )
    assert feature_distillation_loss(teacher, teacher) == 0
    with pytest.raises(ValueError, match="level 1"):
        feature_distillation_loss(student, [teacher[0], torch.zeros(1, 2, 3, 3)])
    with pytest.raises(ValueError, match="unknown"):
        feature_distillation_loss(student, teacher, kind="kl")


def _assert_all_trainable_params_have_grad(model) -> None:
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def _batch_targets(height: int, width: int):
    # Boxes reaching past the image give positives on P6 and P7 too, so every level's scale learns.
    boxes = [
        torch.tensor([[8.0, 8.0, 60.0, 70.0], [100.0, 30.0, 250.0, 200.0], [-200.0, -200.0, 500.0, 500.0]]),
        torch.tensor([[30.0, 40.0, 90.0, 64.0], [0.0, 0.0, 250.0, 300.0], [-600.0, -600.0, 900.0, 900.0]]),
    ]
    labels = [torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1])]
    return compute_fcos_targets(boxes, labels, level_shapes(height, width, pyramid_levels(0)))


@pytest.mark.parametrize("shift", [0, 1])
def test_gradients_reach_every_detector_parameter(shift: int) -> None:
    model = build_detector(tiny_model_config(pyramid_shift=shift)).train()
    hr_images = torch.randn(2, 3, 256, 256)
    outputs = model(make_lr_batch(hr_images, shift))
    losses = fcos_losses(outputs, _batch_targets(256, 256))
    sum(losses.values()).backward()
    _assert_all_trainable_params_have_grad(model)


def test_gradients_reach_every_teacher_parameter() -> None:
    teacher = build_teacher(tiny_model_config(arch="msad_teacher")).train()
    hr_images = torch.randn(2, 3, 256, 256)
    outputs = teacher(hr_images, make_lr_batch(hr_images))
    targets = _batch_targets(256, 256)
    total = sum(
        weight * sum(fcos_losses(branch, targets).values())
        for weight, branch in ((1.0, outputs.hr), (1.0, outputs.lr), (0.4, outputs.fused))
    )
    total.backward()
    _assert_all_trainable_params_have_grad(teacher)
