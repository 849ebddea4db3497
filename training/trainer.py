"""A plain training loop with hooks (detectron2/timm style), AMP and fault checks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from msad_deploy.training.dist import DistContext
from msad_deploy.training.hooks import Hook
from msad_deploy.training.tasks import Task
from torch import Tensor, nn

from msad_deploy.config import Config, TrainConfig

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the iteration and the term."""


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on everything but normalisation parameters (detectron2's default)."""
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (no_decay if isinstance(module, NORM_TYPES) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=train.base_lr, momentum=train.momentum)


def lr_factor(iteration: int, train: TrainConfig) -> float:
    """Multiplier of base_lr at ``iteration``: linear warm-up, then step decay or cosine."""
    if train.schedule == "step":
        factor = train.gamma ** sum(iteration >= step for step in train.steps)
    elif train.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, train.max_iters) / train.max_iters))
    else:
        raise ValueError(f"train.schedule must be 'step' or 'cosine', got {train.schedule!r}")
    if iteration < train.warmup_iters:
        alpha = iteration / train.warmup_iters
        factor *= train.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(0, train)  # validates the schedule name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, train))


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: None (fp32) on CPU or when off; bf16 where supported under "auto", else fp16."""
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"train.amp must be auto, bf16, fp16 or off, got {mode!r}")
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


class Trainer:
    """Runs ``task.losses`` for ``max_iters`` steps from ``start_iter``, calling hooks after each.

    Attributes hooks read: ``iteration`` (0-based index of the step just done), ``last_losses``
    (detached loss terms), ``state`` (best AP and its iteration; saved in checkpoints).
    """

    def __init__(
        self,
        task: Task,
        trainable: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data_loader: Iterable[Any],
        config: Config,
        ctx: DistContext,
        hooks: Sequence[Hook] = (),
        start_iter: int = 0,
        scaler: torch.amp.GradScaler | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.task = task
        self.trainable = trainable
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data_loader = data_loader
        self.config = config
        self.ctx = ctx
        self.hooks = list(hooks)
        self.start_iter = start_iter
        self.max_iters = config.train.max_iters
        self.scaler = scaler
        self.amp_dtype = amp_dtype
        self.iteration = start_iter
        self.last_losses: dict[str, Tensor] = {}
        self.last_metrics: dict[str, float] = {}
        self.state: dict[str, Any] = {}
        self._params = [p for p in trainable.parameters() if p.requires_grad]

    def train(self) -> None:
        self.task.train()
        try:
            for hook in self.hooks:
                hook.before_train(self)
            data = iter(self.data_loader)
            for iteration in range(self.start_iter, self.max_iters):
                self.iteration = iteration
                self.run_step(next(data))
                for hook in self.hooks:
                    hook.after_step(self)
            for hook in self.hooks:
                hook.after_train(self)
        finally:
            for hook in self.hooks:
                hook.close()

    def _check_finite(self, losses: dict[str, Tensor]) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()])
        finite = torch.isfinite(values)
        flag = finite.all().to(torch.int32)
        if self.ctx.distributed:  # every rank must stop together, or the others hang in backward
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not bool(flag):
            bad = {
                name: float(v)
                for name, v, ok in zip(losses, values.tolist(), finite.tolist(), strict=True)
                if not ok
            }
            where = f"{bad}" if bad else "(on another rank; this rank's losses are finite)"
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iteration}: {where}. Training stopped; the last good "
                "checkpoint is the last.pt written before this iteration. Lower train.base_lr, enable "
                "train.clip_grad_norm, or check the data for broken boxes."
            )

    def run_step(self, batch: Any) -> None:
        batch = batch.to(self.ctx.device)
        autocast = (
            torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )
        with autocast:
            losses = self.task.losses(batch, self.iteration)
        self._check_finite(losses)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        if self.config.train.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.config.train.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.last_losses = {name: value.detach().float() for name, value in losses.items()}
