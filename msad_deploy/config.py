"""Typed configuration: YAML files mapped onto dataclasses, with ``key=value`` overrides.

A config is a tree of dataclasses. ``load_config(path, ["model.backbone=resnet50"])`` reads the
YAML, applies dotted overrides (values parsed as YAML scalars), checks every key and type, and
returns a :class:`Config`. ``config_to_dict`` gives the plain dict stored in every checkpoint and
artifact, so a saved model carries the exact settings it was built with.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


@dataclass
class ModelConfig:
    """Architecture of a detector; the teacher and student share it (widths may differ per model)."""

    # "fcos": single-resolution detector (baselines, student); "msad_teacher": aligned multi-scale teacher.
    arch: str = "fcos"
    backbone: str = "resnet50"
    # torchvision's ImageNet weights, from $TORCH_HOME/hub/checkpoints (downloaded there when missing).
    pretrained: bool = False
    # "bn": trainable BatchNorm (training from scratch); "frozen_bn": FrozenBatchNorm2d (fine-tuning
    # ImageNet weights, detectron2's default).
    backbone_norm: str = "bn"
    # Backbone stages (C2..C5) that keep gradients, counted from C5: 4 = all, 0 = frozen backbone.
    trainable_stages: int = 4
    num_classes: int = 80
    fpn_channels: int = 256
    head_channels: int = 256
    head_num_convs: int = 4
    head_norm_groups: int = 32
    # Head tower normalisation: "gn" (GroupNorm with head_norm_groups, as FCOS), "bn" (BatchNorm shared
    # across levels like the convolutions) or "bn_per_level" (one BatchNorm per level); a BatchNorm
    # folds into its convolution at export, no normalisation op left.
    head_norm: str = "gn"
    prior_prob: float = 0.01
    # Pyramid shift k: the model runs on a 1/2**k input and uses P(3-k)..P(7-k) with HR strides.
    # For the teacher it is the shift of the LR branch (its HR branch always uses P3..P7).
    pyramid_shift: int = 0
    # C-FF reduction ratio (teacher only).
    fusion_reduction: int = 16


@dataclass
class InputConfig:
    """How images become network inputs. Sizes are in the HR frame; a model with pyramid shift k
    sees the padded HR batch downsampled by 2**k (``lr_mode``)."""

    train_min_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    train_max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    horizontal_flip: bool = True
    # Halvings between the HR-frame batch and the network input; None = model.pyramid_shift (the
    # aligned case). The unaligned-distillation ablation uses 1 with pyramid_shift 0: a plain
    # P3..P7 detector fed the 1/2 batch, trained and decoded in the 1/2 frame.
    input_shift: int | None = None
    # Padded HR batches are multiples of this so every LR level aligns with its HR partner.
    size_divisibility: int = 128
    # How the LR batch is made from the padded HR batch: "nearest" (reference) or "bilinear_aa".
    lr_mode: str = "nearest"
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class PostprocessConfig:
    """Decoding and NMS thresholds (FCOS defaults)."""

    score_thresh: float = 0.05
    topk_per_level: int = 1000
    nms_thresh: float = 0.6
    max_detections: int = 100


@dataclass
class LossConfig:
    """FCOS loss settings, shared by every branch."""

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    center_sampling_radius: float = 1.5


@dataclass
class DataConfig:
    """Where a COCO-format dataset lives."""

    root: str = "data/synth"
    train_images: str = "train"
    train_annotations: str = "annotations/instances_train.json"
    val_images: str = "val"
    val_annotations: str = "annotations/instances_val.json"
    num_workers: int = 2
    # "error": stop on bad records; "skip": warn, count and skip them (also images found unreadable
    # while training: each is replaced by the next readable image; evaluation leaves it out).
    on_bad: str = "error"
    # Decode every image once before training/evaluation (cached per annotation file under
    # $MSAD_CACHE_DIR or ~/.cache/msad-deploy/verify/), so unreadable ones stop the run at once
    # (on_bad=error) or are dropped up front (on_bad=skip).
    verify_images: bool = False
    # Largest image accepted, in pixels (width * height), checked from the header before decoding;
    # 0 or null disables. Default: PIL's own limit (89,478,485, a 256 MiB RGB image).
    max_image_pixels: int | None = 89_478_485
    # Scale of COCO's small/medium/large area bounds in evaluation; (image side / 640)**2 for
    # images much smaller than COCO's, so APs/APm/APl keep their meaning. 1.0 = standard COCO.
    eval_area_range_scale: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run (detectron2-style iteration counts)."""

    # Images per iteration over all processes; each of N ranks takes batch_size / N.
    batch_size: int = 16
    max_iters: int = 90000
    # "sgd" (with momentum, detectron2's default) or "adamw" (betas 0.9/0.999; learns faster in
    # the first few hundred iterations from scratch, which is what the minutes-long demo has).
    optimizer: str = "sgd"
    base_lr: float = 0.01
    # SGD only.
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    # "step" (x gamma at each of steps) or "cosine" (to 0 at max_iters).
    schedule: str = "step"
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    # Max global gradient norm; 0 disables clipping.
    clip_grad_norm: float = 0.0
    # Divergence guard, checked every step before the update is applied: training stops when the
    # total loss exceeds divergence_factor x its median over the last divergence_window accepted
    # steps, or the gradient norm (before clipping) exceeds divergence_grad_factor x its median.
    # Generous on purpose: in the CPU preset's first 60 steps (warm-up cut to 20) no recipe went
    # above 1.4x its median loss or 4.3x its median gradient norm. 0 disables a check; a NaN/inf
    # loss or gradient norm always stops (except fp16 AMP steps the grad scaler skips).
    divergence_factor: float = 100.0
    divergence_grad_factor: float = 100.0
    divergence_window: int = 50
    # "auto": bf16 on CUDA where supported, else fp16 with a grad scaler; off on CPU. Or "bf16", "fp16", "off".
    amp: str = "auto"
    sync_bn: bool = False
    seed: int = 0
    # Deterministic kernels and per-sample augmentation seeds: resumed runs match uninterrupted ones.
    deterministic: bool = False
    eval_period: int = 5000
    checkpoint_period: int = 1000
    log_period: int = 20
    eval_batch_size: int = 8
    # "auto": cuda if available, else cpu.
    device: str = "auto"


@dataclass
class TeacherConfig:
    """Loss weights of the aligned multi-scale teacher: L = hr * L(HR) + lr * L(LR) + fused * L(fused)."""

    hr_weight: float = 1.0
    lr_weight: float = 1.0
    fused_weight: float = 0.4


@dataclass
class DistillConfig:
    """MSAD student distillation (METHOD.md section 4)."""

    teacher: str = ""
    # Start the student from the teacher's backbone, FPN and head (reference code).
    init_from_teacher: bool = True
    # "eval": frozen teacher uses running BN statistics; "train": batch statistics (reference code).
    teacher_mode: str = "eval"
    loss: str = "l1"
    alpha: float = 0.2
    temperature: float = 3.0
    warmup_iters: int = 500
    # false: ablation without alignment: a P3..P7 student on the 1/2 input, distilled from teacher
    # features resized to its (unshifted) levels.
    aligned: bool = True
    # Teacher features to distil: "fused" (MSAD), "hr" or "lr"; "auto" = fused when aligned, hr when not.
    teacher_features: str = "auto"


@dataclass
class Config:
    """Everything needed to rebuild a model, its input pipeline and its training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML value to a field's annotated type, with an error naming the key."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation in (str, float) and not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors, missing keys keep defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (only str/int/float/bool/list/dict/None), safe for ``weights_only`` loading."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict; values are parsed as YAML (``[1,2]``, ``true``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. model.backbone=resnet18)"
            )
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs/ holds the shipped presets)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, cls: type[T] = Config
) -> T:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data = load_yaml_mapping(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    where = str(path) if path is not None else "config"
    return from_dict(cls, data, where)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``load_config`` reads back)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
