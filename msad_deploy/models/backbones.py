"""torchvision classification networks cut into stages that return C2..C5.

Weights are random by default. ``pretrained=True`` loads torchvision's ImageNet weights through
torchvision's weights API: from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) when the file is
there, otherwise downloaded into it first (hash-checked). Offline, it fails with one line naming the
URL and the cache path.
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.error
from collections.abc import Callable
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

SUPPORTED_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
BACKBONE_NORMS = ("bn", "frozen_bn")


class Backbone(nn.Module):
    """Sequential stages; stage ``i`` ends at pyramid level ``levels[i]`` (stride 2**level).

    ``forward(images [B, 3, H, W]) -> {level: C_level [B, out_channels[level], H / 2**level, W / 2**level]}``
    for every level in ``levels`` (C2..C5).
    """

    def __init__(self, stages: list[nn.Module], levels: list[int], out_channels: list[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.levels = list(levels)
        self.out_channels = dict(zip(levels, out_channels, strict=True))

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        features = {}
        x = images
        for level, stage in zip(self.levels, self.stages, strict=True):
            x = stage(x)
            features[level] = x
        return features


def _blocks(name: str, model: nn.Module) -> list[nn.Module]:
    """The classification network as a flat sequence of blocks, classifier removed."""
    if name.startswith("resnet"):
        return [
            model.conv1,
            model.bn1,
            model.relu,
            model.maxpool,
            model.layer1,
            model.layer2,
            model.layer3,
            model.layer4,
        ]
    return list(model.features)


def _group_into_stages(blocks: list[nn.Module]) -> tuple[list[nn.Module], list[int], list[int]]:
    """Group blocks so each stage ends where the stride reaches 4, 8, 16, 32 (levels 2..5).

    Strides and channels are read from one forward pass on a small dummy input, so any torchvision
    network whose blocks downsample by 2 can be added without hand-written tables.
    """
    size = 64
    x = torch.zeros(1, 3, size, size)
    block_levels, block_channels = [], []
    with torch.no_grad():
        for block in blocks:
            was_training = block.training
            block.eval()
            x = block(x)
            block.train(was_training)
            block_levels.append(int(round(torch.log2(torch.tensor(size / x.shape[-1])).item())))
            block_channels.append(x.shape[1])
    stages, levels, channels = [], [], []
    start = 0
    for level in (2, 3, 4, 5):
        ends = [i for i, lv in enumerate(block_levels) if lv == level]
        if not ends:
            raise ValueError(f"backbone has no block at stride {2**level}")
        end = ends[-1] + 1
        stages.append(nn.Sequential(*blocks[start:end]))
        levels.append(level)
        channels.append(block_channels[end - 1])
        start = end
    return stages, levels, channels


# torch.hub.load_state_dict_from_url unpickles with weights_only=False unless told otherwise.
_LOAD = {"map_location": "cpu", "weights_only": True}


class WeightsDownloadError(OSError):
    """ImageNet weights are neither cached nor downloadable (no network, proxy, HTTP error, bad hash)."""


def _imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    return torchvision.models.get_model_weights(name).DEFAULT


def imagenet_weights_path(name: str) -> str:
    """Where torch hub caches torchvision's ImageNet weights for ``name`` (honours TORCH_HOME)."""
    filename = os.path.basename(urlparse(_imagenet_weights(name).url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _one_line(error: BaseException) -> str:
    """The cause of a failed download in one line (URLError's reason, not its ``<urlopen error ...>``)."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        error = error.reason if isinstance(error.reason, BaseException) else Exception(str(error.reason))
    return " ".join(str(error).split()) or type(error).__name__


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``name``: the cached file, else downloaded into the cache.

    ``WeightsEnum.get_state_dict`` -> ``torch.hub.load_state_dict_from_url``, which reads a cached file
    as is and checks the sha256 prefix in the file name only on download.
    """
    weights = _imagenet_weights(name)
    path = imagenet_weights_path(name)
    if os.path.isfile(path):
        try:
            return weights.get_state_dict(progress=False, check_hash=True, **_LOAD)
        except Exception as error:  # torch.load of a damaged file raises many types (IndexError too)
            raise ValueError(
                f"cached ImageNet weights {path} for {name} are not readable ({_one_line(error)}); "
                f"delete the file to download {weights.url} again"
            ) from error
    try:
        return weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, **_LOAD)
    except (OSError, http.client.HTTPException, RuntimeError) as error:
        raise WeightsDownloadError(
            f"could not download ImageNet weights for {name} from {weights.url} to {path} "
            f"({_one_line(error)}); connect to the internet, or copy the file to that path "
            f"(or point TORCH_HOME at a cache that has it), or set model.pretrained=false"
        ) from error


def _load_imagenet_weights(name: str, model: nn.Module) -> None:
    state = _imagenet_state_dict(name)
    # FrozenBatchNorm2d drops BatchNorm's num_batches_tracked itself; with "bn" it is loaded.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{imagenet_weights_path(name)} does not match torchvision's {name}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_backbone(
    name: str = "resnet50", pretrained: bool = False, norm: str = "bn", trainable_stages: int = 4
) -> Backbone:
    """Build a torchvision backbone returning C2..C5.

    Args:
        name: one of :data:`SUPPORTED_BACKBONES`.
        pretrained: load torchvision's ImageNet weights from the torch hub cache, downloading them
            there first when they are missing (:class:`WeightsDownloadError` when that fails).
        norm: "bn" (trainable BatchNorm, for training from scratch) or "frozen_bn" (FrozenBatchNorm2d,
            the usual choice when fine-tuning ImageNet weights with small per-GPU batches).
        trainable_stages: how many stages, counted from C5 down, keep gradients (4 = all, 0 = none).
    """
    if name not in SUPPORTED_BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {SUPPORTED_BACKBONES}")
    if norm not in BACKBONE_NORMS:
        raise ValueError(f"unknown backbone norm {norm!r}; choose one of {BACKBONE_NORMS}")
    if not 0 <= trainable_stages <= 4:
        raise ValueError(f"trainable_stages must be in 0..4, got {trainable_stages}")
    norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    model = torchvision.models.get_model(name, weights=None, norm_layer=norm_layer)
    if pretrained:
        _load_imagenet_weights(name, model)
    stages, levels, channels = _group_into_stages(_blocks(name, model))
    for stage in stages[: len(stages) - trainable_stages]:
        stage.requires_grad_(False)
    return Backbone(stages, levels, channels)
