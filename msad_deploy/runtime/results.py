"""What a :class:`~msad_deploy.runtime.Detector` returns per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msad_deploy.models.postprocess import predictions_to_coco


@dataclass(frozen=True, eq=False)
class Result:
    """Detections of one image, sorted by score (descending).

    ``boxes`` float32 [N, 4] xyxy in the image's original pixels; ``scores`` float32 [N];
    ``class_ids`` int64 [N] contiguous class indices (0..C-1); ``class_names`` the N names;
    ``category_ids`` int64 [N] the dataset's category ids (from the inference spec);
    ``image_size`` (height, width) of the image as given.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: tuple[str, ...]
    category_ids: np.ndarray
    image_size: tuple[int, int]

    @classmethod
    def from_tensors(
        cls,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        image_size: tuple[int, int],
        names: list[str],
        category_ids: list[int],
        score_thresh: float | None = None,
    ) -> Result:
        """Unpadded tensors of one image -> Result (``score_thresh`` drops lower scores)."""
        boxes = boxes.detach().to("cpu", torch.float32).numpy().reshape(-1, 4)
        scores = scores.detach().to("cpu", torch.float32).numpy().reshape(-1)
        labels = labels.detach().to("cpu", torch.int64).numpy().reshape(-1)
        if score_thresh is not None:
            keep = scores >= score_thresh
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        ids = np.asarray(category_ids, dtype=np.int64)
        return cls(
            boxes=np.ascontiguousarray(boxes),
            scores=np.ascontiguousarray(scores),
            class_ids=np.ascontiguousarray(labels),
            class_names=tuple(names[i] for i in labels.tolist()),
            category_ids=ids[labels] if len(labels) else np.zeros(0, dtype=np.int64),
            image_size=(int(image_size[0]), int(image_size[1])),
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``{"image_size": {"height", "width"}, "detections": [{"box": [x1, y1, x2, y2],
        "score", "class_id", "class_name", "category_id"}, ...]}``."""
        height, width = self.image_size
        return {
            "image_size": {"height": height, "width": width},
            "detections": [
                {
                    "box": [float(v) for v in box],
                    "score": float(score),
                    "class_id": int(class_id),
                    "class_name": name,
                    "category_id": int(category),
                }
                for box, score, class_id, name, category in zip(
                    self.boxes, self.scores, self.class_ids, self.class_names, self.category_ids
                )
            ],
        }

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results records (``bbox`` xywh, the spec's category ids), as ``msad eval`` writes them."""
        # Each detection indexes its own category id: predictions_to_coco's rounding and xywh, unchanged.
        return predictions_to_coco(
            image_id,
            torch.from_numpy(self.boxes),
            torch.from_numpy(self.scores),
            torch.arange(len(self)),
            self.category_ids.tolist(),
        )

    def __repr__(self) -> str:
        height, width = self.image_size
        top = ", ".join(f"{n} {s:.2f}" for n, s in zip(self.class_names[:3], self.scores[:3].tolist()))
        return f"Result({len(self)} detections in {width}x{height}{': ' + top if top else ''})"
