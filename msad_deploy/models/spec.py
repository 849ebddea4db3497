"""InferenceSpec: how a model is fed and decoded, saved with every checkpoint and artifact.

One place answers "what does this model expect and what do its outputs mean": pixel mean/std,
pyramid and input shift, HR strides, padding multiple, LR downsampling, test sizes, decoding
thresholds, class names and category ids. Evaluation, export, the runtime and the benchmarks read
it from the checkpoint or the artifact's metadata instead of re-deriving it from a training config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from msad_deploy.config import Config
from msad_deploy.models.pyramid import HR_STRIDES, decode_frame_scale, resolve_input_shift

SPEC_VERSION = 1


@dataclass
class InferenceSpec:
    """Everything between a uint8 image and detections in its pixels, for one model.

    ``input_shift`` is the number of 2x downsamplings from the padded HR-frame batch to the network
    input (1 for the MSAD student, 0 for an HR model and for a teacher, whose LR branch is made inside
    the model); ``frame_scale`` (derived) is the size of the frame boxes are decoded in relative to
    the HR frame (1.0 for every aligned model).
    """

    arch: str
    num_classes: int
    pyramid_shift: int = 0
    input_shift: int = 0
    strides: tuple[int, ...] = HR_STRIDES
    size_divisibility: int = 128
    lr_mode: str = "nearest"
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    test_min_size: int = 800
    test_max_size: int = 1333
    score_thresh: float = 0.05
    topk_per_level: int = 1000
    nms_thresh: float = 0.6
    max_detections: int = 100
    # The teacher's branch that is decoded ("fused" is its inference path); unused for FCOS.
    teacher_branch: str = "fused"
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a {self.num_classes}-class model")
        if self.category_ids and len(self.category_ids) != self.num_classes:
            raise ValueError(f"{len(self.category_ids)} category ids for a {self.num_classes}-class model")

    @property
    def frame_scale(self) -> float:
        """Decode frame relative to the HR frame (0.5 only for the unaligned ablation)."""
        return (
            1.0 if self.arch == "msad_teacher" else decode_frame_scale(self.pyramid_shift, self.input_shift)
        )

    @property
    def input_divisor(self) -> int:
        """Network input size = padded HR-frame size / input_divisor."""
        return 2**self.input_shift

    def label_names(self) -> list[str]:
        """Class names, or "class_i" when the checkpoint did not record them."""
        return list(self.class_names) or [f"class_{i}" for i in range(self.num_classes)]

    def label_category_ids(self) -> list[int]:
        """Dataset category id of each contiguous label (labels themselves when unknown)."""
        return list(self.category_ids) or list(range(self.num_classes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists, not tuples), with a format version."""
        data = dataclasses.asdict(self)
        data.update(
            strides=list(self.strides), pixel_mean=list(self.pixel_mean), pixel_std=list(self.pixel_std)
        )
        return {"spec_version": SPEC_VERSION, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferenceSpec:
        data = dict(data)
        version = data.pop("spec_version", SPEC_VERSION)
        if version > SPEC_VERSION:
            raise ValueError(
                f"inference spec version {version} is newer than this msad-deploy understands ({SPEC_VERSION}); "
                "upgrade msad-deploy"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"inference spec has unknown fields {unknown}")
        return cls(**data)

    @classmethod
    def from_config(
        cls,
        config: Config,
        class_names: list[str] | None = None,
        category_ids: list[int] | None = None,
        teacher_branch: str = "fused",
    ) -> InferenceSpec:
        """The spec a model trained with ``config`` is evaluated and deployed with."""
        model, inputs, post = config.model, config.input, config.postprocess
        teacher = model.arch == "msad_teacher"
        return cls(
            arch=model.arch,
            num_classes=model.num_classes,
            pyramid_shift=model.pyramid_shift,
            input_shift=0 if teacher else resolve_input_shift(model.pyramid_shift, inputs.input_shift),
            size_divisibility=inputs.size_divisibility,
            lr_mode=inputs.lr_mode,
            pixel_mean=tuple(inputs.pixel_mean),
            pixel_std=tuple(inputs.pixel_std),
            test_min_size=inputs.test_min_size,
            test_max_size=inputs.test_max_size,
            score_thresh=post.score_thresh,
            topk_per_level=post.topk_per_level,
            nms_thresh=post.nms_thresh,
            max_detections=post.max_detections,
            teacher_branch=teacher_branch,
            class_names=list(class_names or []),
            category_ids=list(category_ids or []),
        )

    def replace(self, **changes: Any) -> InferenceSpec:
        return dataclasses.replace(self, **changes)

    def at_input(self, test_size: int | None = None, size_divisibility: int | None = None) -> InferenceSpec:
        """This spec run at another resolution: HR-frame test size ``test_size`` (the short side; the long
        side bound keeps its ratio, 800/1333 -> 640/1066) and/or inputs padded to ``size_divisibility``.

        Both are deploy-time choices that leave the weights valid: a student at ``test_size`` S still
        sees S / 2. A smaller padding multiple saves compute at sizes between multiples of the
        training one (every level's size is the ceiling of the one below halved, as the convolutions
        compute it).
        """
        changes: dict[str, Any] = {}
        if test_size is not None and test_size != self.test_min_size:
            if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
                raise ValueError(f"test_size must be a positive integer (pixels), got {test_size!r}")
            ratio = self.test_max_size / self.test_min_size
            changes.update(test_min_size=test_size, test_max_size=round(test_size * ratio))
        if size_divisibility is not None and size_divisibility != self.size_divisibility:
            if (
                isinstance(size_divisibility, bool)
                or not isinstance(size_divisibility, int)
                or size_divisibility < 1
                or size_divisibility % self.input_divisor
            ):
                raise ValueError(
                    f"size divisibility must be a positive multiple of {self.input_divisor} (the input shift "
                    f"{self.input_shift} halves the padded frame {self.input_shift} time(s)), got {size_divisibility}"
                )
            changes["size_divisibility"] = size_divisibility
        return self.replace(**changes) if changes else self
