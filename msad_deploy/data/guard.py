"""Bad images met while loading: reported by the main process in one line, never as a worker traceback.

A DataLoader worker that raises hands the main process a multi-line "Caught DataError in DataLoader
worker process 0. Original Traceback ..." message. So the sample side never raises DataError: it
returns a placeholder sample whose target carries the one-line message under ``LOAD_ERROR``
(:class:`GuardedSamples`, or the training sampler's wrapper), or, when it replaced a bad image by a
good one (training with on_bad="skip"), lists the skipped images' messages under ``SKIPPED_IMAGES``.
:class:`CheckedLoader` reads those keys in the main process: it raises DataError(message), or drops
the placeholders (evaluation with on_bad="skip"), and counts and warns about skipped images.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import Dataset

from msad_deploy.data.coco import CocoDetection, DataError, Target, one_line
from msad_deploy.data.transforms import DetectionBatch

# Target key of a placeholder sample: the one-line DataError message of the image it stands for.
LOAD_ERROR = "load_error"
# Target key of a sample that replaced unreadable images: their one-line DataError messages.
SKIPPED_IMAGES = "skipped_images"
# Distinct files warned about by name; later ones are only counted (``CheckedLoader.skipped``).
MAX_NAMED_WARNINGS = 5


def placeholder_sample(image_id: int, message: str) -> tuple[torch.Tensor, Target]:
    """A 1x1 black image standing for an image that could not be loaded: uint8 [3, 1, 1] and a target
    with no boxes, ``image_id`` and ``LOAD_ERROR`` = ``message`` (made one line)."""
    target: Target = {
        "boxes": torch.zeros(0, 4, dtype=torch.float32),
        "labels": torch.zeros(0, dtype=torch.int64),
        "image_id": image_id,
        "orig_size": (1, 1),
        "image_size": (1, 1),
        LOAD_ERROR: one_line(message),
    }
    return torch.zeros(3, 1, 1, dtype=torch.uint8), target


class GuardedSamples(Dataset):
    """``dataset[index]``, or a placeholder sample when it raises DataError (safe across workers)."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        try:
            return self.dataset[index]
        except DataError as error:
            return placeholder_sample(self.dataset.image_ids[index], str(error))


class CheckedLoader:
    """Iterates ``loader`` (DetectionBatch) and acts in the main process on what the samples report.

    A placeholder (``LOAD_ERROR``) raises DataError with its one-line message, unless
    ``drop_unreadable`` (evaluation with on_bad="skip"): then it is removed from its batch (a batch
    left empty is not yielded), its image id is added to ``failed_image_ids`` and a warning names the
    file. ``SKIPPED_IMAGES`` (training with on_bad="skip") are counted in ``skipped`` (message ->
    times met) and ``num_skipped``, with a warning the first time each file is met (the first
    ``MAX_NAMED_WARNINGS`` files), and removed from the targets.
    """

    def __init__(self, loader: Iterable[DetectionBatch], drop_unreadable: bool = False) -> None:
        self.loader = loader
        self.drop_unreadable = drop_unreadable
        self.skipped: Counter[str] = Counter()
        self.failed_image_ids: list[int] = []

    @property
    def num_skipped(self) -> int:
        """How many times an unreadable image was met and replaced (training) or left out (evaluation)."""
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[DetectionBatch]:
        for batch in self.loader:
            checked = self.check(batch)
            if checked is not None:
                yield checked

    def _note_skip(self, message: str, what: str) -> None:
        if message not in self.skipped:
            if len(self.skipped) < MAX_NAMED_WARNINGS:
                warnings.warn(
                    f"skipped an unreadable image (data.on_bad=skip), {what}: {message}", stacklevel=3
                )
            elif len(self.skipped) == MAX_NAMED_WARNINGS:
                warnings.warn(
                    f"more than {MAX_NAMED_WARNINGS} unreadable images skipped; further ones are counted "
                    "without a warning. data.verify_images=true lists them all before training",
                    stacklevel=3,
                )
        self.skipped[message] += 1

    def check(self, batch: DetectionBatch) -> DetectionBatch | None:
        """``batch`` checked as described above; None when nothing of it is left."""
        targets = batch.targets
        if any(SKIPPED_IMAGES in target for target in targets):
            for target in targets:
                for message in target.get(SKIPPED_IMAGES, ()):
                    self._note_skip(message, "the next readable image is used in its place")
            targets = [{k: v for k, v in t.items() if k != SKIPPED_IMAGES} for t in targets]
        failed = [i for i, target in enumerate(targets) if LOAD_ERROR in target]
        if not failed:
            return DetectionBatch(batch.images, batch.image_sizes, targets)
        if not self.drop_unreadable:
            raise DataError(targets[failed[0]][LOAD_ERROR])
        for i in failed:
            self._note_skip(targets[i][LOAD_ERROR], "it is left out of the evaluation")
            self.failed_image_ids.append(int(targets[i]["image_id"]))
        keep = sorted(set(range(len(targets))) - set(failed))
        if not keep:
            return None
        index = torch.tensor(keep)
        return DetectionBatch(batch.images[index], batch.image_sizes[index], [targets[i] for i in keep])
