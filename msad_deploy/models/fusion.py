"""Crossing feature-level fusion (C-FF) of the aligned multi-scale teacher."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossFeatureFusion(nn.Module):
    """Blend each aligned pair (HR P_s, LR P_(s-1)) with two per-image softmax weights.

    z = GAP(concat[hr, lr]) [B, 2C]; w = softmax(W2 relu(W1 z)) [B, 2]; F = w0 * hr + w1 * lr.
    W1: 2C -> 2C / reduction, W2: 2C / reduction -> 2, no biases; one module shared by all levels.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, 2 * channels // reduction)
        self.squeeze = nn.Linear(2 * channels, hidden, bias=False)
        self.excite = nn.Linear(hidden, 2, bias=False)

    def weights(self, hr: Tensor, lr: Tensor) -> Tensor:
        """Per-image fusion weights [B, 2] (HR weight, LR weight) for one aligned level pair."""
        pooled = torch.cat([hr, lr], dim=1).mean(dim=(2, 3))
        return torch.softmax(self.excite(torch.relu(self.squeeze(pooled))), dim=1)

    def forward(self, hr_features: list[Tensor], lr_features: list[Tensor]) -> list[Tensor]:
        fused = []
        for hr, lr in zip(hr_features, lr_features, strict=True):
            if hr.shape != lr.shape:
                raise ValueError(
                    f"C-FF needs aligned levels of equal shape, got HR {tuple(hr.shape)} and LR {tuple(lr.shape)}; "
                    "pad HR batches to a multiple of 128 (input.size_divisibility)"
                )
            w = self.weights(hr, lr)[:, :, None, None]
            fused.append(w[:, 0:1] * hr + w[:, 1:2] * lr)
        return fused
