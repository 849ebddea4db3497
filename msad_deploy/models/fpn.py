"""Feature pyramid P2..P7 that builds and computes only the levels a model uses.

Same design as torchvision's FeaturePyramidNetwork + LastLevelP6P7 (1x1 laterals, top-down
nearest upsampling, 3x3 output convs, P6 = conv(C5, stride 2), P7 = conv(relu(P6), stride 2)),
written out because torchvision's version always builds and computes every level it is given:
an MSAD student must not own an unused P7 (DDP would need find_unused_parameters) and an HR
branch must not pay for P2 at full resolution. The teacher builds P2..P7 once and each branch
asks for its own range.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# Highest level produced by the backbone itself; levels above come from extra convs on C5.
TOP_BACKBONE_LEVEL = 5


class FPN(nn.Module):
    """``forward(features {level: C_level}, levels) -> [P_level [B, out_channels, h, w] for level in levels]``.

    Args:
        in_channels: channels of each backbone level this FPN may use, e.g. {2: 256, ..., 5: 2048}.
        out_channels: channels of every output level.
        levels: all levels this FPN may be asked for (contiguous), e.g. (3..7) or (2..6) or (2..7).
    """

    def __init__(self, in_channels: dict[int, int], out_channels: int, levels: tuple[int, ...]) -> None:
        super().__init__()
        levels = tuple(levels)
        if list(levels) != list(range(levels[0], levels[-1] + 1)):
            raise ValueError(f"FPN levels must be contiguous, got {levels}")
        self.levels = levels
        self.out_channels = out_channels
        inner = [lv for lv in levels if lv <= TOP_BACKBONE_LEVEL]
        missing = [lv for lv in inner if lv not in in_channels]
        if missing:
            raise ValueError(f"FPN levels {missing} need backbone features the backbone does not provide")
        self.lateral = nn.ModuleDict({str(lv): nn.Conv2d(in_channels[lv], out_channels, 1) for lv in inner})
        self.output = nn.ModuleDict(
            {str(lv): nn.Conv2d(out_channels, out_channels, 3, padding=1) for lv in inner}
        )
        extra = [lv for lv in levels if lv > TOP_BACKBONE_LEVEL]
        self.extra = nn.ModuleDict()
        for lv in extra:
            # P6 reads C5 (RetinaNet/FCOS), P7 reads relu(P6).
            source_channels = (
                in_channels[TOP_BACKBONE_LEVEL] if lv == TOP_BACKBONE_LEVEL + 1 else out_channels
            )
            self.extra[str(lv)] = nn.Conv2d(source_channels, out_channels, 3, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: dict[int, Tensor], levels: tuple[int, ...] | None = None) -> list[Tensor]:
        levels = self.levels if levels is None else tuple(levels)
        if levels[0] < self.levels[0] or levels[-1] > self.levels[-1]:
            raise ValueError(f"FPN built for levels {self.levels} was asked for {levels}")
        outputs: dict[int, Tensor] = {}
        lowest = levels[0]
        # Top-down pathway from C5, stopping at the lowest requested level.
        top_down = self.lateral[str(TOP_BACKBONE_LEVEL)](features[TOP_BACKBONE_LEVEL])
        if TOP_BACKBONE_LEVEL in levels:
            outputs[TOP_BACKBONE_LEVEL] = self.output[str(TOP_BACKBONE_LEVEL)](top_down)
        for lv in range(TOP_BACKBONE_LEVEL - 1, lowest - 1, -1):
            lateral = self.lateral[str(lv)](features[lv])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            if lv in levels:
                outputs[lv] = self.output[str(lv)](top_down)
        previous = features[TOP_BACKBONE_LEVEL]
        for lv in range(TOP_BACKBONE_LEVEL + 1, levels[-1] + 1):
            source = previous if lv == TOP_BACKBONE_LEVEL + 1 else F.relu(previous)
            previous = self.extra[str(lv)](source)
            outputs[lv] = previous
        return [outputs[lv] for lv in levels]
