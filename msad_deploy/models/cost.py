"""FLOPs and parameters of a model at a given input size, split backbone / FPN / head (/ fusion)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from msad_deploy.models.fcos import FCOSDetector
from msad_deploy.models.teacher import AlignedMultiScaleTeacher

PARTS = ("backbone", "fpn", "head", "fusion")


@dataclass
class ModelCost:
    """GFLOPs (1 multiply-add = 2 FLOPs, torch.utils.flop_counter's convention) and parameters (M)."""

    input_size: tuple[int, int]
    gflops: dict[str, float] = field(default_factory=dict)
    params_m: dict[str, float] = field(default_factory=dict)

    @property
    def total_gflops(self) -> float:
        return sum(self.gflops.values())

    @property
    def total_params_m(self) -> float:
        return sum(self.params_m.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "total_gflops": self.total_gflops, "total_params_m": self.total_params_m}


@torch.no_grad()
def model_cost(model: nn.Module, input_size: tuple[int, int], batch_size: int = 1) -> ModelCost:
    """Count FLOPs of one forward pass on a [batch_size, 3, H, W] input (H, W = ``input_size``).

    For an :class:`FCOSDetector` the input is the network input itself (for a student: the LR size).
    For the teacher, ``input_size`` is the HR size and the LR branch gets half of it.
    """
    height, width = input_size
    parameter = next(model.parameters())
    images = torch.zeros(batch_size, 3, height, width, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            if isinstance(model, AlignedMultiScaleTeacher):
                scale = 2**model.lr_shift
                model(images, images[..., ::scale, ::scale])
            elif isinstance(model, FCOSDetector):
                model(images)
            else:
                raise TypeError(
                    f"model_cost expects an FCOSDetector or AlignedMultiScaleTeacher, got {type(model).__name__}"
                )
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    cost = ModelCost(input_size=(height, width))
    for part in PARTS:
        module = getattr(model, part, None)
        if module is None:
            continue
        cost.gflops[part] = sum(counts.get(f"{prefix}.{part}", {}).values()) / 1e9
        cost.params_m[part] = sum(p.numel() for p in module.parameters()) / 1e6
    return cost
