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

from msad_deploy.data.transforms import inference_size
from msad_deploy.models.postprocess import clip_boxes, decode, level_sizes, topk_candidates
from msad_deploy.models.pyramid import make_lr_batch
from msad_deploy.models.spec import InferenceSpec

STAGES = ("raw", "candidates")


class InGraphPreprocess(nn.Module):
    """uint8 frames [B, H, W, 3] -> (network input [B, 3, h, w], decode-frame sizes [B, 2], scale [B, 4]).

    The same steps as :func:`msad_deploy.runtime.preprocess.preprocess`: resize the short side to
    the test size (``inference_size``'s exact integer rule; antialiased bilinear, rounded to uint8
    values as the Python path does), pad to the size divisibility, normalise, downsample by
    2**input_shift. Sizes are computed from the frame's shape, so a graph exported with dynamic
    height and width takes frames of any size.
    """

    def __init__(self, spec: InferenceSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        images = frames.permute(0, 3, 1, 2).float()
        height, width = images.shape[-2], images.shape[-1]
        new_h, new_w = inference_size(height, width, spec.test_min_size, spec.test_max_size)
        # A resize to the same size is the identity, so frames already at the test size pass unchanged.
        images = F.interpolate(
            images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
        )
        images = images.round().clamp(0, 255)
        step = spec.size_divisibility
        images = F.pad(
            images,
            (0, (new_w + step - 1) // step * step - new_w, 0, (new_h + step - 1) // step * step - new_h),
        )
        images = (images / 255.0 - self.mean) / self.std
        inputs = make_lr_batch(images, spec.input_shift, spec.lr_mode)
        resized = torch.tensor([new_h, new_w], dtype=torch.float32, device=frames.device)
        original = torch.tensor([height, width], dtype=torch.float32, device=frames.device)
        batch = frames.shape[0]
        frame_sizes = (resized * spec.frame_scale).expand(batch, 2)
        scale = (original / (resized * spec.frame_scale))[[1, 0, 1, 0]].expand(batch, 4)
        return inputs, frame_sizes, scale


class ExportGraph(nn.Module):
    """The exported computation: [preprocess ->] network -> decode [-> per-level top-k -> clip]."""

    def __init__(
        self,
        network: nn.Module,
        spec: InferenceSpec,
        stage: str = "candidates",
        preprocess: bool = False,
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
        self.preprocess = InGraphPreprocess(spec) if preprocess else None

    def input_names(self) -> list[str]:
        if self.preprocess is not None:
            return ["frames"]
        return ["images"] if self.stage == "raw" else ["images", "image_sizes"]

    def output_names(self) -> list[str]:
        # With preprocessing, "network_input" is kept as a named intermediate tensor for verification.
        extra = ["network_input"] if self.preprocess is not None else []
        if self.stage == "raw":
            return ["boxes", "scores"] + extra
        names = ["cand_boxes", "cand_scores", "cand_labels"]
        names += ["scale"] if self.preprocess is not None else []
        # Kept as named intermediate tensors once NMS is appended, for verification.
        return names + ["decoded_boxes", "decoded_scores"] + extra

    def forward(self, inputs: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        scale = None
        if self.preprocess is not None:
            inputs, image_sizes, scale = self.preprocess(inputs)
        outputs = self.network(inputs.half() if self.half else inputs)
        boxes, scores = decode(outputs, self.spec.strides, self.spec.score_thresh)
        extra = (inputs,) if scale is not None else ()
        if self.stage == "raw":
            return ((boxes * scale[:, None], scores) if scale is not None else (boxes, scores)) + extra
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
        return result + (decoded_boxes, decoded_scores) + extra
