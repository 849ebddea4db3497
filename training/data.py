"""Training data stream: a deterministic function of (seed, iteration), so runs can resume exactly.

The sampler walks an endless sequence of seeded epoch permutations; position p of that sequence
is always the same image with the same augmentation (each sample's transform draws from a RNG
seeded with (seed, p)). Iteration i of a run with global batch B consumes positions
[i * B, (i + 1) * B), and rank r of N takes its contiguous B / N share: a resumed run, or a DDP
run, sees exactly the images of an uninterrupted single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from msad_deploy.config import Config
from msad_deploy.data.coco import CocoDetection, DataError, one_line
from msad_deploy.data.guard import LOAD_ERROR, SKIPPED_IMAGES, CheckedLoader, placeholder_sample
from msad_deploy.data.transforms import Collate, build_transform


class TrainingSampler(Sampler[tuple[int, int]]):
    """Endless ``(position, dataset index)`` pairs for one rank, starting at ``start_iter``."""

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        seed: int,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError("cannot train on an empty dataset")
        if batch_size % world_size:
            raise ValueError(f"global batch size {batch_size} is not divisible by {world_size} processes")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.per_rank = batch_size // world_size
        self.seed = seed
        self.start_iter = start_iter
        self.rank = rank

    def _index_at(self, position: int, cache: dict[int, torch.Tensor]) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        if epoch not in cache:
            cache.clear()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(self.dataset_size, generator=generator)
        return int(cache[epoch][offset])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cache: dict[int, torch.Tensor] = {}
        iteration = self.start_iter
        while True:
            first = iteration * self.batch_size + self.rank * self.per_rank
            for position in range(first, first + self.per_rank):
                yield position, self._index_at(position, cache)
            iteration += 1


class SeededAugmentation(Dataset):
    """Applies ``transform`` to ``dataset[index]`` with torch's RNG seeded from (seed, position).

    An image that cannot be loaded (DataError) never raises here, so no worker traceback reaches the
    user: with the dataset's ``on_bad="error"`` the sample is a placeholder carrying the one-line
    message, which :class:`~msad_deploy.data.guard.CheckedLoader` raises in the main process; with
    "skip" the next dataset index that loads takes its place (deterministic, so resumed runs still
    match, and the batch size stays constant), its target listing the skipped images' messages.
    """

    def __init__(self, dataset: CocoDetection, transform: Any, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int) -> tuple[torch.Tensor, dict[str, Any], list[str]]:
        """``dataset[i]`` for the first loadable i in index, index + 1, ... (wrapping), and the messages
        of the images skipped before it; a placeholder when on_bad="error" or nothing loads."""
        skipped: list[str] = []
        size = len(self.dataset)
        for step in range(size):
            candidate = (index + step) % size
            try:
                image, target = self.dataset[candidate]
                return image, target, skipped
            except DataError as error:
                if getattr(self.dataset, "on_bad", "error") != "skip":
                    return (*placeholder_sample(self.dataset.image_ids[candidate], str(error)), [])
                skipped.append(one_line(error))
        message = f"no image of {self.dataset.ann_file} could be loaded ({size} tried), e.g. {skipped[0]}"
        return (*placeholder_sample(self.dataset.image_ids[index], message), [])

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        position, index = key
        image, target, skipped = self._load(index)
        if LOAD_ERROR in target:
            return image, target
        # fork_rng restores the caller's RNG, so this is safe with num_workers=0 as well.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + position)
            image, target = self.transform(image, target)
        if skipped:
            target = {**target, SKIPPED_IMAGES: skipped}
        return image, target


def build_train_loader(
    config: Config, dataset: CocoDetection, start_iter: int = 0, rank: int = 0, world_size: int = 1
) -> CheckedLoader:
    """Per-rank loader of :class:`~msad_deploy.data.transforms.DetectionBatch` (batch_size / world_size images).

    Wrapped in a :class:`~msad_deploy.data.guard.CheckedLoader`: an unreadable image stops training
    with a one-line DataError (on_bad="error") or is replaced and counted with a warning ("skip").
    """
    train = config.train
    sampler = TrainingSampler(len(dataset), train.batch_size, train.seed, start_iter, rank, world_size)
    samples = SeededAugmentation(dataset, build_transform(config.input, train=True), train.seed)
    workers = config.data.num_workers
    loader = DataLoader(
        samples,
        batch_size=train.batch_size // world_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(config.input.size_divisibility),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return CheckedLoader(loader)
