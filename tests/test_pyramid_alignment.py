"""The pyramid shift: which levels are built and computed, and exact HR/LR alignment."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msad_deploy.data.transforms import Collate
from msad_deploy.models import (
    build_detector,
    build_teacher,
    compute_locations,
    pyramid_levels,
    size_divisibility,
)
from msad_deploy.models.pyramid import HR_STRIDES, level_shapes, make_lr_batch
from tests.conftest import tiny_model_config


def test_levels_for_each_shift() -> None:
    assert pyramid_levels(0) == (3, 4, 5, 6, 7)
    assert pyramid_levels(1) == (2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match="at most 1"):
        pyramid_levels(2)
    with pytest.raises(ValueError, match=">= 0"):
        pyramid_levels(-1)
    assert size_divisibility(1) == 128


def test_unused_levels_are_not_built() -> None:
    hr = build_detector(tiny_model_config(pyramid_shift=0))
    student = build_detector(tiny_model_config(pyramid_shift=1))
    teacher = build_teacher(tiny_model_config(arch="msad_teacher", pyramid_shift=1))
    assert sorted(hr.fpn.lateral) == ["3", "4", "5"] and sorted(hr.fpn.extra) == ["6", "7"]
    assert sorted(student.fpn.lateral) == ["2", "3", "4", "5"] and sorted(student.fpn.extra) == ["6"]
    assert sorted(teacher.fpn.lateral) == ["2", "3", "4", "5"] and sorted(teacher.fpn.extra) == ["6", "7"]


def test_hr_branch_does_not_compute_p2() -> None:
    teacher = build_teacher(tiny_model_config(arch="msad_teacher"))
    called = []
    teacher.fpn.lateral["2"].register_forward_hook(lambda *_: called.append("p2"))
    teacher.fpn(teacher.backbone(torch.zeros(1, 3, 128, 128)), teacher.hr_levels)
    assert called == []
    teacher.fpn(teacher.backbone(torch.zeros(1, 3, 64, 64)), teacher.lr_levels)
    assert called == ["p2"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.tuples(st.integers(40, 700), st.integers(40, 700)), min_size=1, max_size=3),
)
def test_lr_levels_match_hr_levels_after_collate(sizes: list[tuple[int, int]]) -> None:
    teacher = build_teacher(tiny_model_config(arch="msad_teacher")).eval()
    samples = [(torch.zeros(3, h, w, dtype=torch.uint8), {"boxes": torch.zeros(0, 4)}) for h, w in sizes]
    batch = Collate(size_divisibility(1))(samples)
    hr_images = batch.images.float()
    with torch.no_grad():
        hr_features, lr_features, fused = teacher.extract_features(hr_images, make_lr_batch(hr_images))
    hr_shapes = [tuple(f.shape[-2:]) for f in hr_features]
    lr_shapes = [tuple(f.shape[-2:]) for f in lr_features]
    assert hr_shapes == lr_shapes == [tuple(f.shape[-2:]) for f in fused]
    assert hr_shapes == level_shapes(*hr_images.shape[-2:], pyramid_levels(0))
    # Cell centres of LR level P(l-1), in LR pixels with its native stride, land on HR level P(l)'s centres.
    lr_native = compute_locations(lr_shapes, tuple(s // 2 for s in HR_STRIDES))
    hr_frame = compute_locations(hr_shapes, HR_STRIDES)
    for lr_points, hr_points in zip(lr_native, hr_frame, strict=True):
        torch.testing.assert_close(lr_points * 2, hr_points)


def test_unaligned_batch_is_rejected_by_fusion() -> None:
    teacher = build_teacher(tiny_model_config(arch="msad_teacher")).eval()
    hr = torch.zeros(1, 3, 128, 128)
    lr = torch.zeros(1, 3, 40, 40)  # not half of the HR input: levels cannot pair up
    with pytest.raises(ValueError, match="multiple of 128"):
        teacher(hr, lr)


def test_make_lr_batch_modes() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    nearest = make_lr_batch(images, 1, "nearest")
    torch.testing.assert_close(nearest, images[..., ::2, ::2])
    checkerboard = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    checkerboard = checkerboard.float().expand(1, 3, 8, 8)
    assert make_lr_batch(checkerboard, 1, "nearest").max() == 0  # aliasing: every kept pixel is black
    smooth = make_lr_batch(checkerboard, 1, "bilinear_aa")
    assert smooth.shape == (1, 3, 4, 4)
    torch.testing.assert_close(smooth[..., 1:3, 1:3], torch.full((1, 3, 2, 2), 0.5))
    with pytest.raises(ValueError, match="not divisible"):
        make_lr_batch(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match="unknown LR mode"):
        make_lr_batch(images, 1, "bicubic")
