"""A plain training loop with hooks (detectron2/timm style), AMP and fault checks."""

from __future__ import annotations

import math
import statistics
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


class DivergenceError(FloatingPointError):
    """Training stopped because it diverged: an exploding or NaN/inf loss or gradient norm, or
    non-finite weights. The message names the iteration, the cause, the checkpoint to resume from
    and the likely fix; ``iteration``: the weights after that many steps are the bad ones."""

    def __init__(self, message: str, iteration: int) -> None:
        super().__init__(message)
        self.iteration = iteration


class NonFiniteLossError(DivergenceError):
    """A loss term became NaN or inf; the message names the iteration and the term."""


class DivergenceGuard:
    """Decides before each update whether the step looks divergent, against running medians.

    A NaN/inf loss term or gradient norm always stops; so does a total loss above
    ``train.divergence_factor`` x its median over the last ``train.divergence_window`` accepted
    steps, or a gradient norm above ``train.divergence_grad_factor`` x its median (0 disables
    either). Medians ignore the odd spike and need no warm-up: a jump of 100x in one step is never
    normal. ``history`` (plain lists) lives in ``Trainer.state`` so a resumed run keeps it.
    """

    def __init__(self, train: TrainConfig, history: dict[str, Any]) -> None:
        self.loss_factor = train.divergence_factor
        self.grad_factor = train.divergence_grad_factor
        self.window = max(1, train.divergence_window)
        self.history = history
        history.setdefault("total", [])
        history.setdefault("grad_norm", [])
        history.setdefault("terms", {})

    def check(
        self, iteration: int, losses: dict[str, float], grad_norm: float | None
    ) -> DivergenceError | None:
        """The error to stop with, or None. ``grad_norm`` None: not checked (an fp16 step the
        grad scaler skips)."""
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if bad:
            return NonFiniteLossError(f"non-finite loss at iteration {iteration}: {bad}.", iteration)
        terms = ", ".join(f"{name} {value:.4g}" for name, value in losses.items())
        if grad_norm is not None and not math.isfinite(grad_norm):
            return DivergenceError(
                f"training diverged at iteration {iteration}: non-finite gradient norm ({grad_norm}) "
                f"while the loss terms were finite ({terms}).",
                iteration,
            )
        total = sum(losses.values())
        median = self._median(self.history["total"])
        if self.loss_factor > 0 and median > 0 and total > self.loss_factor * median:
            name = self._worst_term(losses)
            term_median = self._median(self.history["terms"].get(name, []))
            return DivergenceError(
                f"training diverged at iteration {iteration}: {name} = {losses[name]:.4g} (median "
                f"{term_median:.4g}); the total loss {total:.4g} is {total / median:.3g}x its median "
                f"{median:.4g} over the last {len(self.history['total'])} steps "
                f"(train.divergence_factor={self.loss_factor:g}).",
                iteration,
            )
        median = self._median(self.history["grad_norm"])
        if (
            grad_norm is not None
            and self.grad_factor > 0
            and median > 0
            and grad_norm > self.grad_factor * median
        ):
            return DivergenceError(
                f"training diverged at iteration {iteration}: the gradient norm {grad_norm:.4g} is "
                f"{grad_norm / median:.3g}x its median {median:.4g} over the last "
                f"{len(self.history['grad_norm'])} steps (train.divergence_grad_factor={self.grad_factor:g}); "
                f"loss terms: {terms}.",
                iteration,
            )
        return None

    def accept(self, losses: dict[str, float], grad_norm: float | None) -> None:
        """Add a step that passed ``check`` to the running statistics."""
        self._push(self.history["total"], sum(losses.values()))
        if grad_norm is not None:
            self._push(self.history["grad_norm"], grad_norm)
        for name, value in losses.items():
            self._push(self.history["terms"].setdefault(name, []), value)

    def _push(self, values: list[float], value: float) -> None:
        values.append(value)
        del values[: -self.window]

    def _worst_term(self, losses: dict[str, float]) -> str:
        """The term that grew most against its own median (the largest one without a history)."""

        def growth(name: str) -> float:
            median = self._median(self.history["terms"].get(name, []))
            return losses[name] / median if median > 0 else math.inf

        return max(losses, key=lambda name: (growth(name), losses[name]))

    @staticmethod
    def _median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan


OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (``train.optimizer``); weight decay on everything but normalisation
    parameters (detectron2's default). Group 0 decays, group 1 never does."""
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}")
    decay, no_decay = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (no_decay if isinstance(module, NORM_TYPES) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.base_lr)
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
    (detached loss terms), ``last_grad_norm`` (before clipping), ``state`` (best AP and its
    iteration, the divergence guard's history; saved in checkpoints).

    Every step is checked by a :class:`DivergenceGuard` after backward and before the update, so a
    diverging step is never applied; the :class:`DivergenceError` it raises gets a sentence from
    each hook's ``on_divergence`` (the checkpoint to resume from) and the likely fix.
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
        self.last_grad_norm = math.nan
        self.last_metrics: dict[str, float] = {}
        self.state: dict[str, Any] = {}
        self._params = [p for p in trainable.parameters() if p.requires_grad]
        self._weights_checked_at = -1

    def train(self) -> None:
        self.task.train()
        # Built here, not in __init__: a resumed run restores ``state`` after construction.
        self.guard = DivergenceGuard(self.config.train, self.state.setdefault("divergence_history", {}))
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
        except DivergenceError as error:
            notes = [note for hook in self.hooks if (note := hook.on_divergence(self, error))]
            message = " ".join([str(error), *notes, self._likely_fix(error)])
            raise type(error)(message, error.iteration) from None
        finally:
            for hook in self.hooks:
                hook.close()

    def _likely_fix(self, error: DivergenceError) -> str:
        train = self.config.train
        clip = f"now {train.clip_grad_norm:g}" if train.clip_grad_norm > 0 else "now off"
        fix = f"Likely fix: lower train.base_lr (now {train.base_lr:g}) or set train.clip_grad_norm (e.g. 10; {clip})"
        if isinstance(error, NonFiniteLossError):
            fix += ", or check the data for broken boxes"
        return fix + "."

    def _check_step(self, losses: dict[str, Tensor], grad_norm: Tensor) -> None:
        """Raise before the update when the guard finds the step divergent.

        One all-reduce per step: the loss terms and the gradient norm averaged over ranks, so every
        rank sees the same values, takes the same decision and stops together (a rank that stopped
        alone would leave the others waiting in the next collective)."""
        terms = [v.detach().float() for v in losses.values()]
        values = torch.stack([*terms, grad_norm.detach().float().to(terms[0].device)])
        if self.ctx.distributed:
            dist.all_reduce(values)
            values = values / self.ctx.world_size
        *floats, norm = values.tolist()
        self.last_grad_norm = norm
        named = dict(zip(losses, floats, strict=True))
        # Under fp16 AMP an inf/NaN gradient is routine: the grad scaler skips the step, lowers its scale.
        checked_norm = None if self.scaler is not None and not math.isfinite(norm) else norm
        error = self.guard.check(self.iteration, named, checked_norm)
        if error is not None:
            raise error
        self.guard.accept(named, checked_norm)

    def check_weights(self) -> None:
        """Raise :class:`DivergenceError` when a floating parameter, buffer or optimizer state tensor
        is NaN/inf; hooks call it on every rank before writing a checkpoint (flag all-reduced)."""
        done = self.iteration + 1
        if self._weights_checked_at == done:
            return
        named = [(k, t) for k, t in self.task.model.state_dict().items() if t.is_floating_point()]
        named += [
            (f"optimizer {key}", t)
            for param_state in self.optimizer.state.values()
            for key, t in param_state.items()
            if torch.is_tensor(t) and t.is_floating_point()
        ]
        finite = (
            torch.stack([torch.isfinite(t).all() for _, t in named])
            if named
            else torch.ones(1, dtype=torch.bool)
        )
        flag = finite.all().to(torch.int32)
        if self.ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not bool(flag):
            bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
            where = f"e.g. {bad[:3]}" if bad else "on another rank"
            raise DivergenceError(
                f"training diverged: non-finite weights after iteration {done} ({where}); "
                "no checkpoint was written from them.",
                done,
            )
        self._weights_checked_at = done

    def run_step(self, batch: Any) -> None:
        batch = batch.to(self.ctx.device)
        autocast = (
            torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )
        with autocast:
            losses = self.task.losses(batch, self.iteration)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        # The norm before clipping; max_norm=inf only measures it (grads are multiplied by exactly 1).
        clip = self.config.train.clip_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, clip if clip > 0 else math.inf)
        self._check_step(losses, grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.last_losses = {name: value.detach().float() for name, value in losses.items()}
