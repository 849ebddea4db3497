"""Trainer hooks: logging (progress bar, JSONL, TensorBoard), periodic evaluation, checkpoints.

A hook sees the trainer before training, after every step and after training ends normally;
``on_divergence`` when the run stops with a :class:`DivergenceError` (a hook may add a sentence
to its message); ``close`` runs in every case (including errors) to release files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from msad_deploy.training.checkpoint import capture_rng_state, saved_iteration
from tqdm import tqdm

from msad_deploy.models.build import save_model_checkpoint

if TYPE_CHECKING:
    from msad_deploy.training.trainer import DivergenceError, Trainer


class Hook:
    def before_train(self, trainer: Trainer) -> None: ...

    def after_step(self, trainer: Trainer) -> None: ...

    def after_train(self, trainer: Trainer) -> None: ...

    def on_divergence(self, trainer: Trainer, error: DivergenceError) -> str | None:
        """Training stopped with ``error``; a sentence to append to its message, or None."""
        return None

    def close(self) -> None: ...


def _is_period(trainer: Trainer, period: int) -> bool:
    done = trainer.iteration + 1
    return done == trainer.max_iters or (period > 0 and done % period == 0)


class MetricsLogger(Hook):
    """Every ``period`` steps: window-averaged loss terms (averaged over ranks), learning rate and
    global images/s, to a tqdm bar, ``metrics.jsonl`` and TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, period: int, batch_size: int, progress: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.period = max(1, period)
        self.batch_size = batch_size
        self.progress = progress
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.window_start = 0.0
        self.bar: tqdm | None = None
        self.writer = None

    def before_train(self, trainer: Trainer) -> None:
        if not trainer.ctx.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(
            total=trainer.max_iters,
            initial=trainer.start_iter,
            desc="train",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.writer = None
        self.window_start = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        for name, value in trainer.last_losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if not _is_period(trainer, self.period):
            return
        names = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float32) for n in names]) / self.steps
        if trainer.ctx.distributed:
            values = values.to(trainer.ctx.device)
            dist.all_reduce(values)
            values = values / trainer.ctx.world_size
        elapsed = time.perf_counter() - self.window_start
        record: dict[str, Any] = {
            "iteration": trainer.iteration + 1,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            **{name: float(v) for name, v in zip(names, values.tolist(), strict=True)},
        }
        record["total_loss"] = float(sum(record[n] for n in names))
        record["images_per_sec"] = self.steps * self.batch_size / max(elapsed, 1e-9)
        if trainer.ctx.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(trainer.ctx.device) / 2**30
        if trainer.ctx.is_main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.bar is not None:
                short = {n.replace("loss_", ""): f"{record[n]:.3f}" for n in names}
                self.bar.set_postfix(
                    lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_sec']:.1f}", **short
                )
            if self.writer is not None:
                for key, value in record.items():
                    if key != "iteration":
                        self.writer.add_scalar(f"train/{key}", value, record["iteration"])
        self.sums, self.steps = {}, 0
        self.window_start = time.perf_counter()

    def write_eval(self, iteration: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as handle:
            clean = {k: (None if math.isnan(v) else v) for k, v in metrics.items()}
            handle.write(json.dumps({"iteration": iteration, "eval": clean}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key}", value, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class EvalHook(Hook):
    """Every ``period`` steps and at the end: COCO metrics (all ranks take part, sharded); the main
    rank logs them and writes ``best.pt`` (inference checkpoint) when AP improves. Non-finite
    weights stop training (:meth:`Trainer.check_weights`) before they are evaluated or saved."""

    def __init__(
        self,
        period: int,
        evaluate: Callable[[], dict[str, float]],
        out_dir: Path,
        logger: MetricsLogger,
        checkpoint_extra: dict,
    ) -> None:
        self.period = period
        self.evaluate = evaluate
        self.out_dir = Path(out_dir)
        self.logger = logger
        self.checkpoint_extra = checkpoint_extra

    def after_step(self, trainer: Trainer) -> None:
        if not _is_period(trainer, self.period):
            return
        trainer.check_weights()
        metrics = self.evaluate()
        trainer.task.train()
        trainer.last_metrics = metrics
        if not trainer.ctx.is_main:
            return
        iteration = trainer.iteration + 1
        self.logger.write_eval(iteration, metrics)
        ap = metrics.get("AP", math.nan)
        if not math.isnan(ap) and ap > trainer.state.get("best_ap", -1.0):
            trainer.state.update(best_ap=ap, best_iteration=iteration)
            save_model_checkpoint(
                self.out_dir / "best.pt",
                trainer.task.model,
                trainer.config,
                extra={"iteration": iteration, "metrics": metrics, **self.checkpoint_extra},
            )
        tqdm.write(f"[iter {iteration}] " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))


class CheckpointHook(Hook):
    """Every ``period`` steps and at the end: ``last.pt`` with the full training state (main rank).

    Retention: the ``last.pt`` being replaced becomes ``prev.pt`` (see :func:`atomic_save`), so two
    checkpoints are kept and ``last.pt`` exists at every moment. Weights are checked finite on
    every rank first (:meth:`Trainer.check_weights`): a NaN/inf checkpoint is never written. When
    training diverges, a ``last.pt`` whose weights produced the diverging step (written at that
    iteration) is discarded and ``prev.pt`` takes its place, so ``--resume`` with a lower
    learning rate continues from weights from before the divergence.
    """

    def __init__(self, out_dir: Path, period: int, checkpoint_extra: dict) -> None:
        self.path = Path(out_dir) / "last.pt"
        self.prev_path = Path(out_dir) / "prev.pt"
        self.period = period
        self.checkpoint_extra = checkpoint_extra

    def after_step(self, trainer: Trainer) -> None:
        if not _is_period(trainer, self.period):
            return
        trainer.check_weights()
        if not trainer.ctx.is_main:
            return
        training_state = {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else {},
            "iteration": trainer.iteration + 1,
            "rng": capture_rng_state(),
            "trainer_state": dict(trainer.state),
        }
        save_model_checkpoint(
            self.path,
            trainer.task.model,
            trainer.config,
            extra={**training_state, **self.checkpoint_extra},
            previous=self.prev_path,
        )

    def on_divergence(self, trainer: Trainer, error: DivergenceError) -> str | None:
        if not trainer.ctx.is_main:
            return None
        last, prev = self.path, self.prev_path
        last_iteration = saved_iteration(last)
        if last_iteration is None:
            return f"No checkpoint was written yet ({last} does not exist): start the run again."
        if last_iteration < error.iteration:
            note = f"Continue from {last} (iteration {last_iteration}, before the divergence) with --resume"
            prev_iteration = saved_iteration(prev)
            if prev_iteration is not None:
                note += f"; {prev} holds iteration {prev_iteration} (copy it over {last} to go further back)"
            return note + "."
        # last.pt was written from the weights that diverged: they are not worth resuming from.
        prev_iteration = saved_iteration(prev)
        try:
            if prev_iteration is not None:
                os.replace(prev, last)
                return (
                    f"{last} (iteration {last_iteration}) held the weights that diverged and was replaced "
                    f"by {prev.name} (iteration {prev_iteration}): continue from it with --resume."
                )
            last.unlink()
        except OSError as err:
            return f"{last} (iteration {last_iteration}) holds the weights that diverged; discarding it failed: {err}."
        return (
            f"{last} (iteration {last_iteration}) held the weights that diverged and was deleted; no earlier "
            "checkpoint is kept: start the run again without --resume."
        )
