"""Single-resolution FCOS detector: HR/LR baselines and the MSAD student."""

from __future__ import annotations

from torch import Tensor, nn

from msad_deploy.models.backbones import Backbone
from msad_deploy.models.fpn import FPN
from msad_deploy.models.head import FCOSHead, FCOSOutputs
from msad_deploy.models.pyramid import HR_STRIDES, input_scale, pyramid_levels


class FCOSDetector(nn.Module):
    """Backbone + FPN + FCOS head on one input resolution.

    With ``pyramid_shift = k`` the detector expects a 1/2**k input and uses levels P(3-k)..P(7-k),
    decoded with the HR strides 8..128, so its outputs are in the HR frame (input pixels x 2**k).
    k = 0 is a plain FCOS; k = 1 is the MSAD student (or the shifted-pyramid LR control).

    ``forward(images [B, 3, H, W] normalised) -> FCOSOutputs`` (raw, undecoded).
    """

    def __init__(self, backbone: Backbone, fpn: FPN, head: FCOSHead, pyramid_shift: int = 0) -> None:
        super().__init__()
        self.pyramid_shift = pyramid_shift
        self.levels = pyramid_levels(pyramid_shift)
        if tuple(fpn.levels) != self.levels:
            raise ValueError(
                f"FPN levels {fpn.levels} do not match pyramid shift {pyramid_shift} ({self.levels})"
            )
        self.backbone = backbone
        self.fpn = fpn
        self.head = head

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides outputs are decoded with: always the HR ones."""
        return HR_STRIDES

    @property
    def input_scale(self) -> int:
        """HR-frame pixels per input pixel (2**pyramid_shift)."""
        return input_scale(self.pyramid_shift)

    def extract_features(self, images: Tensor) -> list[Tensor]:
        """FPN levels P(3-k)..P(7-k), each [B, C, h_i, w_i]."""
        return self.fpn(self.backbone(images), self.levels)

    def forward(self, images: Tensor) -> FCOSOutputs:
        return self.head(self.extract_features(images))
