"""Tensor-only modules that are exported: the deployable network plus decode, nothing else.

``ExportGraph`` holds only what inference runs (a student has no P7 and no teacher; a teacher
exports one branch) and stops before NMS: ONNX export appends NonMaxSuppression or TensorRT's NMS
to its candidate outputs (export/nms.py), so every backend runs the same decode and top-k.

Inputs and outputs (B batch, N candidates, L locations, C classes):
- ``images`` float32 [B, 3, h, w]: the normalised network input (``preprocess.network_input``);
  with ``preprocess=True`` instead ``frames`` uint8 [B, H, W, 3] raw RGB frames of one size.
- ``image_sizes`` float32 [B, 2] (h, w) of the resized images in the decode frame (clipping);
  not needed for raw outputs or with in-graph preprocessing.
- stage "raw": ``boxes`` [B, L, 4], ``scores`` [B, L, C] (decoded; original pixels with preprocessing).
- stage "candidates": ``cand_boxes`` [B, N, 4] clipped, ``cand_scores`` [B, N], ``cand_labels``
  [B, N] int64, with preprocessing ``scale`` [B, 4] (decode frame -> original pixels), and the
  decoded ``decoded_boxes`` [B, L, 4] / ``decoded_scores`` [B, L, C] (decode frame), which stay in
  the final graph as named intermediate tensors so verification can compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msad_deploy.data.transforms import make_lr_batch
from msad_deploy.models.postprocess import clip_boxes, decode, level_sizes, topk_candidates
from msad_deploy.models.spec import InferenceSpec

STAGES = ("raw", "candidates")


class InGraphPreprocess(nn.Module):
    """uint8 frames [B, H, W, 3] -> (network input [B, 3, h, w], decode-frame sizes [B, 2], scale [B, 4]).

    The same steps as :func:`msad_deploy.runtime.preprocess.preprocess`: resize the short side to
    the test size (antialiased bilinear, rounded to uint8 values as the Python path does), pad to
    the size divisibility, normalise, downsample by 2**input_shift. Frame size is fixed at export.
    """

    def __init__(self, spec: InferenceSpec, frame_size: tuple[int, int]) -> None:
        super().__init__()
        from msad_deploy.data.transforms import inference_size, padded_size

        self.spec = spec
        height, width = frame_size
        self.resized = inference_size(height, width, spec.test_min_size, spec.test_max_size)
        self.padded = padded_size(*self.resized, spec.size_divisibility)
        self.register_buffer("mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)
        frame = spec.frame_scale
        sizes = torch.tensor([self.resized[0] * frame, self.resized[1] * frame])
        ratio = torch.tensor([height / self.resized[0], width / self.resized[1]]) / frame
        self.register_buffer("frame_sizes", sizes, persistent=False)
        self.register_buffer("scale", ratio[[1, 0, 1, 0]], persistent=False)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        images = frames.permute(0, 3, 1, 2).float()
        if tuple(images.shape[-2:]) != self.resized:
            images = F.interpolate(
                images, size=self.resized, mode="bilinear", align_corners=False, antialias=True
            )
            images = images.round().clamp(0, 255)
        pad_h, pad_w = self.padded[0] - self.resized[0], self.padded[1] - self.resized[1]
        images = F.pad(images, (0, pad_w, 0, pad_h))
        images = (images / 255.0 - self.mean) / self.std
        inputs = make_lr_batch(images, self.spec.input_shift, self.spec.lr_mode)
        batch = frames.shape[0]
        return inputs, self.frame_sizes.expand(batch, 2), self.scale.expand(batch, 4)


class ExportGraph(nn.Module):
    """The exported computation: [preprocess ->] network -> decode [-> per-level top-k -> clip]."""

    def __init__(
        self,
        network: nn.Module,
        spec: InferenceSpec,
        stage: str = "candidates",
        frame_size: tuple[int, int] | None = None,
        half: bool = False,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        # fp16: the network runs in half precision; inputs, decode and NMS stay float32.
        self.half = half
        self.network = network.half() if half else network
        self.spec = spec
        self.stage = stage
        self.preprocess = InGraphPreprocess(spec, frame_size) if frame_size is not None else None

    def input_names(self) -> list[str]:
        if self.preprocess is not None:
            return ["frames"]
        return ["images"] if self.stage == "raw" else ["images", "image_sizes"]

    def output_names(self) -> list[str]:
        if self.stage == "raw":
            return ["boxes", "scores"]
        names = ["cand_boxes", "cand_scores", "cand_labels"]
        names += ["scale"] if self.preprocess is not None else []
        # Kept as named intermediate tensors once NMS is appended, for verification.
        return names + ["decoded_boxes", "decoded_scores"]

    def forward(self, inputs: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        scale = None
        if self.preprocess is not None:
            inputs, image_sizes, scale = self.preprocess(inputs)
        outputs = self.network(inputs.half() if self.half else inputs)
        boxes, scores = decode(outputs, self.spec.strides, self.spec.score_thresh)
        if self.stage == "raw":
            return (boxes * scale[:, None], scores) if scale is not None else (boxes, scores)
        assert image_sizes is not None, "the candidates stage needs image_sizes"
        decoded_boxes, decoded_scores = boxes, scores
        sizes = level_sizes(outputs)
        # Constant k per level (zero-score padding) keeps the exported top-k free of shape guards.
        k = self.spec.topk_per_level
        per_level = -(-k // scores.shape[-1])
        boxes = torch.cat(
            [torch.cat([b, b.new_zeros(b.shape[0], per_level, 4)], 1) for b in boxes.split(sizes, 1)], 1
        )
        scores = torch.cat(
            [
                torch.cat([s, s.new_zeros(s.shape[0], per_level, s.shape[2])], 1)
                for s in scores.split(sizes, 1)
            ],
            1,
        )
        padded_sizes = [n + per_level for n in sizes]
        cand_boxes, cand_scores, cand_labels = topk_candidates(boxes, scores, padded_sizes, k, clamp_k=False)
        cand_boxes = clip_boxes(cand_boxes, image_sizes)
        result = (cand_boxes, cand_scores, cand_labels) + ((scale,) if scale is not None else ())
        return result + (decoded_boxes, decoded_scores)
