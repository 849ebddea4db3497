"""The inference spec, the one preprocessing path and decode/select: what export and runtime stand on."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from msad_deploy.config import Config, InputConfig
from msad_deploy.data.transforms import Collate, build_transform, inference_size
from msad_deploy.models import build_model, load_model, save_model_checkpoint
from msad_deploy.models.build import load_model_checkpoint
from msad_deploy.models.head import FCOSOutputs
from msad_deploy.models.postprocess import decode, level_sizes, postprocess_detections, select
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.preprocess import prepare_batch, preprocess
from tests.conftest import tiny_model_config


def _config(**model) -> Config:
    return Config(
        model=tiny_model_config(num_classes=4, **model),
        input=InputConfig(test_min_size=96, test_max_size=160),
    )


def test_spec_travels_with_checkpoint_and_old_checkpoints_still_load(tmp_path) -> None:
    config = _config(pyramid_shift=1)
    path = tmp_path / "student.pt"
    save_model_checkpoint(path, build_model(config.model), config, ["a", "b", "c", "d"], [1, 3, 5, 7])
    model, spec, _, payload = load_model(path)
    assert spec == InferenceSpec.from_dict(payload["spec"])
    assert (spec.input_shift, spec.frame_scale, spec.input_divisor) == (1, 1.0, 2)
    assert spec.category_ids == [1, 3, 5, 7] and spec.class_names == ["a", "b", "c", "d"]
    assert InferenceSpec.from_dict(spec.to_dict()) == spec
    # A checkpoint from before specs existed: the spec is derived from its config and class lists.
    old = load_model_checkpoint(path)
    del old["spec"]
    torch.save(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").spec == spec
    # Overrides change how it is fed, never silently the architecture.
    assert load_model(path, overrides=["input.test_min_size=64"]).spec.test_min_size == 64
    with pytest.raises(ValueError, match="do not fit the architecture"):
        load_model(path, overrides=["model.head_channels=16"])


def test_spec_input_shift_per_model_kind() -> None:
    assert InferenceSpec.from_config(_config()).input_shift == 0
    teacher = InferenceSpec.from_config(_config(arch="msad_teacher", pyramid_shift=1))
    assert (teacher.input_shift, teacher.frame_scale) == (0, 1.0)
    unaligned = _config()
    unaligned.input.input_shift = 1
    spec = InferenceSpec.from_config(unaligned)
    assert (spec.input_shift, spec.frame_scale) == (1, 0.5)
    with pytest.raises(ValueError, match="newer"):
        InferenceSpec.from_dict({**spec.to_dict(), "spec_version": 99})


@pytest.mark.parametrize("size", [(333, 517), (128, 128), (61, 400)])
def test_inference_resize_matches_training_torchvision_rule(size) -> None:
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8)
    expected = v2.RandomShortestSize(min_size=[96], max_size=160, antialias=True)(image)
    resized, target = build_transform(_config().input, train=False)(image, {"boxes": torch.zeros(0, 4)})
    # Same size rule; pixels within one level of torchvision's fixed-point uint8 kernel (ours resizes
    # in float and rounds, as exported graphs do).
    assert resized.shape == expected.shape
    assert (resized.int() - expected.int()).abs().max() <= 1
    assert tuple(resized.shape[-2:]) == inference_size(*size, 96, 160) == target["image_size"]


def test_preprocess_equals_dataset_path_on_odd_sizes() -> None:
    spec = InferenceSpec.from_config(_config(pyramid_shift=1))
    images = [
        torch.randint(0, 256, (3, 333, 517), dtype=torch.uint8),
        torch.randint(0, 256, (3, 97, 61), dtype=torch.uint8),
    ]
    transform = build_transform(_config().input, train=False)
    samples = [transform(image, {"orig_size": tuple(image.shape[-2:])}) for image in images]
    batch = Collate(spec.size_divisibility)(samples)
    from_dataset = prepare_batch(
        batch.images, batch.image_sizes, torch.tensor([t["orig_size"] for t in batch.targets]), spec
    )
    direct = preprocess(images, spec)
    for a, b in zip(from_dataset, direct, strict=True):
        assert torch.equal(a, b)
    sizes = [inference_size(333, 517, 96, 160), inference_size(97, 61, 96, 160)]
    assert sizes == [(96, 149), (152, 96)]
    assert direct.image_sizes.tolist() == [list(s) for s in sizes]  # the student decodes in the HR frame
    assert direct.inputs.shape == (2, 3, 128, 128)  # padded to 256x256 in the HR frame, then halved
    assert direct.original_sizes.tolist() == [[333, 517], [97, 61]]


def _random_outputs(batch: int = 2, classes: int = 3, shapes=((16, 12), (8, 6), (4, 3), (2, 2), (1, 1))):
    g = torch.Generator().manual_seed(0)
    return FCOSOutputs(
        [torch.randn(batch, classes, h, w, generator=g) for h, w in shapes],
        [torch.rand(batch, 4, h, w, generator=g) * 4 for h, w in shapes],
        [torch.randn(batch, 1, h, w, generator=g) for h, w in shapes],
    )


def test_decode_hand_built_location() -> None:
    outputs = _random_outputs(batch=1, classes=2)
    for level in outputs.box_regression:
        level.zero_()
    outputs.box_regression[1][0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # P4 cell (0, 1), stride 16
    outputs.cls_logits[1][0, :, 0, 1] = torch.tensor([10.0, -10.0])
    outputs.centerness[1][0, 0, 0, 1] = 0.0
    boxes, scores = decode(outputs, score_thresh=0.05)
    index = 16 * 12 + 1  # P3 locations come first
    torch.testing.assert_close(boxes[0, index], torch.tensor([24.0 - 16, 8 - 32, 24 + 48, 8 + 64]))
    torch.testing.assert_close(
        scores[0, index], torch.tensor([(torch.sigmoid(torch.tensor(10.0)) * 0.5).sqrt(), 0.0])
    )


def test_decode_select_equals_postprocess_and_contract() -> None:
    outputs = _random_outputs()
    image_sizes = torch.tensor([[120, 90], [128, 96]])
    boxes, scores = decode(outputs)
    assert boxes.shape == (2, sum(level_sizes(outputs)), 4) and scores.shape == (2, boxes.shape[1], 3)
    detections = select(
        boxes, scores, level_sizes(outputs), image_sizes, topk_per_level=50, max_detections=20
    )
    assert detections.boxes.shape == (2, 20, 4) and detections.labels.dtype == torch.int64
    assert detections.num_detections.dtype == torch.int64
    per_image = postprocess_detections(outputs, image_sizes, topk_per_level=50, max_detections=20)
    for i, expected in enumerate(per_image):
        n = int(detections.num_detections[i])
        assert n == len(expected["boxes"]) > 0
        torch.testing.assert_close(detections.boxes[i, :n], expected["boxes"])
        assert (detections.labels[i, n:] == -1).all() and (detections.scores[i, n:] == 0).all()
        assert (detections.scores[i, :n].diff() <= 0).all()
