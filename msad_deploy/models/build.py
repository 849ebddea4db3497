"""Builders that turn a :class:`ModelConfig` into modules, and model checkpoints for inference.

A model checkpoint is a plain dict (tensors, str, int, float, lists, dicts) so that
``torch.load(path, weights_only=True)`` can read it: ``{"model": state_dict, "config": resolved
config dict, "arch": str, "class_names": [...], "label_to_category_id": [...], "version": str}``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from msad_deploy import __version__
from msad_deploy.config import Config, ConfigError, apply_overrides, config_to_dict, from_dict
from msad_deploy.models.backbones import build_backbone
from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.fpn import FPN
from msad_deploy.models.fusion import CrossFeatureFusion
from msad_deploy.models.head import FCOSHead
from msad_deploy.models.pyramid import pyramid_levels
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.models.teacher import AlignedMultiScaleTeacher

ARCHS = ("fcos", "msad_teacher")


def _head(cfg, num_levels: int) -> FCOSHead:
    return FCOSHead(
        in_channels=cfg.fpn_channels,
        num_classes=cfg.num_classes,
        channels=cfg.head_channels,
        num_convs=cfg.head_num_convs,
        num_levels=num_levels,
        norm_groups=cfg.head_norm_groups,
        prior_prob=cfg.prior_prob,
        norm=cfg.head_norm,
    )


def build_detector(cfg) -> FCOSDetector:
    """Single-resolution FCOS with pyramid shift ``cfg.pyramid_shift`` (0: plain, 1: MSAD student)."""
    backbone = build_backbone(cfg.backbone, cfg.pretrained, cfg.backbone_norm, cfg.trainable_stages)
    levels = pyramid_levels(cfg.pyramid_shift)
    fpn = FPN(backbone.out_channels, cfg.fpn_channels, levels)
    return FCOSDetector(backbone, fpn, _head(cfg, len(levels)), cfg.pyramid_shift)


def build_teacher(cfg) -> AlignedMultiScaleTeacher:
    """Aligned multi-scale teacher whose LR branch uses shift ``max(cfg.pyramid_shift, 1)``."""
    lr_shift = max(cfg.pyramid_shift, 1)
    backbone = build_backbone(cfg.backbone, cfg.pretrained, cfg.backbone_norm, cfg.trainable_stages)
    levels = tuple(range(pyramid_levels(lr_shift)[0], pyramid_levels(0)[-1] + 1))
    fpn = FPN(backbone.out_channels, cfg.fpn_channels, levels)
    fusion = CrossFeatureFusion(cfg.fpn_channels, cfg.fusion_reduction)
    return AlignedMultiScaleTeacher(backbone, fpn, _head(cfg, len(pyramid_levels(0))), fusion, lr_shift)


def build_model(cfg) -> nn.Module:
    """Dispatch on ``cfg.arch``."""
    if cfg.arch == "fcos":
        return build_detector(cfg)
    if cfg.arch == "msad_teacher":
        return build_teacher(cfg)
    raise ConfigError(f"model.arch must be one of {ARCHS}, got {cfg.arch!r}")


def atomic_save(payload: dict[str, Any], path: str | Path, previous: str | Path | None = None) -> None:
    """``torch.save`` to ``path.tmp``, fsync, then rename over ``path``: a crash or a full disk never
    leaves a half-written ``path``; the previous file stays intact and the temporary one is removed.

    ``previous``: the file being replaced is kept under that name (a hard link, or a copy where the
    file system has none, then a rename), so ``path`` exists at every moment. A failed write is an
    OSError naming ``path`` and the cause (full disk, read-only file system, ...), also when
    torch's zip writer reports it as a RuntimeError.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    keep_tmp = Path(previous).with_name(Path(previous).name + ".tmp") if previous is not None else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_tmp is not None and path.exists():
            keep_tmp.unlink(missing_ok=True)
            try:
                os.link(path, keep_tmp)
            except OSError:  # no hard links here (FAT, some network file systems)
                shutil.copyfile(path, keep_tmp)
            os.replace(keep_tmp, previous)
        os.replace(tmp, path)
    except BaseException as err:
        error = _write_error(err, path)  # before the cleanup frees space again
        for leftover in (tmp, keep_tmp):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
        if error is not None:
            raise error from err
        raise


# How torch's zip writer (inline_container.cc) reports a failed write: the errno is lost.
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


def _write_error(err: BaseException, path: Path) -> OSError | None:
    """An OSError naming ``path`` for a failed checkpoint write, or None for anything else."""
    if not isinstance(err, (OSError, RuntimeError)):
        return None
    chain, cause = [], err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    code = next((e.errno for e in chain if isinstance(e, OSError) and e.errno), None)
    if code is None:
        if not (isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES)):
            return None
        try:  # the partial file is still there: a full disk shows no free space now
            full = shutil.disk_usage(path.parent).free < 2**20
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
    if code == errno.ENOSPC:
        message = f"no space left on device while writing {path}; free space or choose another --out"
    elif code == errno.EDQUOT:
        message = f"disk quota exceeded while writing {path}; free space or choose another --out"
    elif code == errno.EROFS:
        message = f"read-only file system: cannot write {path}; choose another --out"
    elif code in (errno.EACCES, errno.EPERM):
        message = f"permission denied: cannot write {path}; choose another --out"
    else:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        message = f"could not write {path}: {first_line}"
    return OSError(code, message)


def save_model_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: Config,
    class_names: list[str] | None = None,
    label_to_category_id: list[int] | None = None,
    extra: dict[str, Any] | None = None,
    previous: str | Path | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file, then rename), with its inference spec: the one
    writer of ``best.pt`` and ``last.pt``.

    ``extra`` adds keys (a training checkpoint adds optimizer, scheduler, RNG and iteration); it may
    carry ``class_names`` / ``label_to_category_id`` instead of the arguments. ``previous``: keep
    the file being replaced under that name (see :func:`atomic_save`).
    """
    extra = dict(extra or {})
    class_names = list(extra.pop("class_names", class_names) or [])
    label_to_category_id = list(extra.pop("label_to_category_id", label_to_category_id) or [])
    spec = InferenceSpec.from_config(config, class_names, label_to_category_id)
    payload = {
        "model": model.state_dict(),
        "config": config_to_dict(config),
        "arch": config.model.arch,
        "class_names": class_names,
        "label_to_category_id": label_to_category_id,
        "spec": spec.to_dict(),
        "version": __version__,
        **extra,
    }
    atomic_save(payload, path, previous=previous)


def load_model_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path} is not a readable msad-deploy checkpoint: {err}") from err
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise ValueError(f"{path} is not an msad-deploy checkpoint (expected keys 'model' and 'config')")
    return payload


def checkpoint_spec(payload: dict[str, Any], config: Config, teacher_branch: str = "fused") -> InferenceSpec:
    """The inference spec of a checkpoint under ``config`` (its own config, possibly overridden).

    Checkpoints written before specs existed derive it from their config and class lists; a config
    override (e.g. ``input.test_min_size=512``) always wins over a stored spec.
    """
    return InferenceSpec.from_config(
        config,
        payload.get("class_names") or (payload.get("spec") or {}).get("class_names"),
        payload.get("label_to_category_id") or (payload.get("spec") or {}).get("category_ids"),
        teacher_branch,
    )


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns: the model in eval mode, its inference spec, config and raw checkpoint."""

    model: nn.Module
    spec: InferenceSpec
    config: Config
    checkpoint: dict[str, Any]


def load_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    overrides: list[str] | None = None,
    teacher_branch: str = "fused",
) -> LoadedModel:
    """Rebuild a model from its checkpoint (``overrides``: ``key=value`` config changes that do not
    alter the architecture, e.g. test sizes or thresholds)."""
    payload = load_model_checkpoint(path, map_location)
    data = payload["config"]
    if overrides:
        data = apply_overrides(copy.deepcopy(data), overrides)
    config = from_dict(Config, data, f"{path}:config")
    config.model.pretrained = False  # the checkpoint holds the weights
    model = build_model(config.model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(
            f"{path}: the weights do not fit the architecture its config describes ({first}); the file is "
            "corrupt or was edited, or an override changed model.*"
        ) from err
    return LoadedModel(model.eval(), checkpoint_spec(payload, config, teacher_branch), config, payload)
