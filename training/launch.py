"""Turn a recipe name and a config into a training run: data, model, task, DDP, hooks, resume."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from msad_deploy.training.checkpoint import (
    load_training_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
)
from msad_deploy.training.data import build_train_loader
from msad_deploy.training.dist import DistContext, barrier, init_distributed
from msad_deploy.training.hooks import CheckpointHook, EvalHook, Hook, MetricsLogger
from msad_deploy.training.tasks import (
    BaselineTask,
    DistillationTask,
    Task,
    TeacherTask,
    describe,
    describe_fresh_init,
    init_student_from_teacher,
)
from msad_deploy.training.trainer import (
    Trainer,
    build_optimizer,
    build_scheduler,
    lr_factor,
    resolve_amp,
)
from torch.nn.parallel import DistributedDataParallel

from msad_deploy.config import Config, ConfigError, TrainConfig, from_dict, save_config
from msad_deploy.data.coco import CocoDetection
from msad_deploy.evaluation.evaluator import evaluate_model
from msad_deploy.models.build import build_model, load_model_checkpoint
from msad_deploy.models.teacher import AlignedMultiScaleTeacher

RECIPES = ("baseline", "teacher", "student")
log = logging.getLogger("msad.train")


def _dataset_paths(config: Config, split: str) -> tuple[Path, Path]:
    root = Path(config.data.root)
    images = getattr(config.data, f"{split}_images")
    annotations = getattr(config.data, f"{split}_annotations")
    return root / images, root / annotations


def _check_classes(config: Config, dataset: CocoDetection, ann_file: Path) -> None:
    if config.model.num_classes != dataset.num_classes:
        raise ConfigError(
            f"model.num_classes={config.model.num_classes} but {ann_file} has {dataset.num_classes} categories; "
            f"set model.num_classes={dataset.num_classes}"
        )


def load_teacher(
    path: str | Path, num_classes: int, device: torch.device
) -> tuple[AlignedMultiScaleTeacher, Config]:
    """A frozen teacher from its checkpoint; errors before training when it cannot serve as one."""
    if not path:
        raise ConfigError(
            "the student recipe needs a teacher checkpoint: --teacher PATH (or distill.teacher=PATH)"
        )
    payload = load_model_checkpoint(path)
    teacher_config = from_dict(Config, payload["config"], f"{path}:config")
    if teacher_config.model.arch != "msad_teacher":
        raise ConfigError(
            f"{path} holds a {teacher_config.model.arch!r} model, not an aligned multi-scale teacher; "
            "train one with `msad train teacher`"
        )
    if teacher_config.model.num_classes != num_classes:
        raise ConfigError(
            f"teacher {path} predicts {teacher_config.model.num_classes} classes but the student's dataset has "
            f"{num_classes}; distil from a teacher trained on the same categories"
        )
    teacher_config.model.pretrained = False
    teacher = build_model(teacher_config.model)
    teacher.load_state_dict(payload["model"])
    return teacher.to(device), teacher_config


def prepare_config(recipe: str, config: Config, teacher_config: Config | None = None) -> Config:
    """Fix the architecture fields each recipe implies (a student's shift follows its teacher)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")
    if recipe == "teacher":
        config.model.arch = "msad_teacher"
        config.model.pyramid_shift = max(1, config.model.pyramid_shift)
    else:
        config.model.arch = "fcos"
    if recipe == "student":
        assert teacher_config is not None
        shift = teacher_config.model.pyramid_shift
        config.model.pyramid_shift = shift if config.distill.aligned else 0
        config.input.input_shift = None if config.distill.aligned else shift
    return config


def _build_task(
    recipe: str, config: Config, ctx: DistContext, teacher: AlignedMultiScaleTeacher | None
) -> Task:
    model = build_model(config.model).to(ctx.device)
    if recipe == "baseline":
        return BaselineTask(model, config)
    if recipe == "teacher":
        return TeacherTask(model, config)
    assert teacher is not None
    if config.distill.init_from_teacher:
        teacher_state = teacher.state_dict()
        copied, fresh = init_student_from_teacher(model, teacher_state, config.distill.teacher)
        if fresh and ctx.is_main:
            log.info("%s", describe_fresh_init(model, teacher_state, config.distill.teacher, copied, fresh))
    return DistillationTask(model, teacher, config)


def _apply_config_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainConfig
) -> list[str]:
    """Let the resumed run's config win over the optimizer and scheduler state of its checkpoint.

    Their state dicts carry the old base_lr, the learning rate of the next step (from the old
    schedule), momentum and weight decay, so resuming a diverged run with a lower
    ``train.base_lr`` or another schedule would otherwise keep the old values. The learning rate
    is recomputed exactly as LambdaLR does, so an unchanged config resumes bit for bit. Returns
    what changed (``name old -> new``).
    """
    changed = []
    if any(base != train.base_lr for base in scheduler.base_lrs):
        changed.append(f"train.base_lr {scheduler.base_lrs[0]:g} -> {train.base_lr:g}")
        scheduler.base_lrs = [train.base_lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = train.base_lr
    lr = train.base_lr * lr_factor(scheduler.last_epoch, train)
    if any(group["lr"] != lr for group in optimizer.param_groups):
        changed.append(f"learning rate {optimizer.param_groups[0]['lr']:g} -> {lr:g}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        scheduler._last_lr = [lr] * len(optimizer.param_groups)
    # Group 0 decays, group 1 (normalisation parameters) never does: see build_optimizer.
    for group, weight_decay in zip(optimizer.param_groups, (train.weight_decay, 0.0), strict=False):
        for key, value in (("momentum", train.momentum), ("weight_decay", weight_decay)):
            if key not in group:  # AdamW has no momentum
                continue
            if group[key] != value:
                entry = f"train.{key} {group[key]:g} -> {value:g}"
                changed += [entry] if entry not in changed else []
                group[key] = value
    return changed


def run_training(
    recipe: str,
    config: Config,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    extra_hooks: Sequence[Hook] = (),
) -> dict[str, Any]:
    """Train ``recipe`` ("baseline", "teacher" or "student") into ``out_dir``; returns final metrics.

    ``out_dir`` receives config.yaml, metrics.jsonl, last.pt (full training state), prev.pt (the
    last.pt before it) and best.pt (inference checkpoint of the best evaluation). ``resume``
    continues last.pt with this config (a lower ``train.base_lr`` after a divergence takes effect).
    Raises :class:`DivergenceError` (a FloatingPointError) when training diverges and OSError when
    a checkpoint cannot be written. Under torchrun every rank calls this.
    """
    out_dir = Path(out_dir)
    train_cfg = config.train
    ctx = init_distributed(train_cfg.device)
    last_path = out_dir / "last.pt"
    if last_path.exists() and not resume:
        raise FileExistsError(
            f"{out_dir} already holds a run ({last_path}); pass --resume to continue it or pick another --out"
        )
    if ctx.is_main:
        for stale in remove_stale_temporaries(out_dir):
            log.warning("removed %s: a partial checkpoint left by an interrupted run", stale)
    if train_cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(train_cfg.seed)

    train_images, train_ann = _dataset_paths(config, "train")
    val_images, val_ann = _dataset_paths(config, "val")
    data = config.data
    dataset = CocoDetection(
        train_images,
        train_ann,
        transforms=None,
        on_bad=data.on_bad,
        verify_images=data.verify_images,
        max_image_pixels=data.max_image_pixels,
        progress=progress,
    )
    _check_classes(config, dataset, train_ann)

    teacher = None
    if recipe == "student":
        teacher, teacher_config = load_teacher(config.distill.teacher, dataset.num_classes, ctx.device)
        prepare_config(recipe, config, teacher_config)
    else:
        prepare_config(recipe, config)
    task = _build_task(recipe, config, ctx, teacher)
    if train_cfg.sync_bn and ctx.distributed:
        task.trainable = torch.nn.SyncBatchNorm.convert_sync_batchnorm(task.trainable)
    optimizer = build_optimizer(task.trainable, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg)
    amp_dtype = resolve_amp(train_cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_iter, trainer_state = 0, {}
    if resume and last_path.exists():
        state = load_training_checkpoint(last_path, map_location=ctx.device)
        task.model.load_state_dict(state["model"])
        saved = "adamw" if "betas" in state["optimizer"]["param_groups"][0] else "sgd"
        if saved != train_cfg.optimizer:
            raise ConfigError(
                f"{last_path} was trained with train.optimizer={saved}; resume it with "
                f"train.optimizer={saved}, or start a new run in another --out"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        changed = _apply_config_hyperparameters(optimizer, scheduler, train_cfg)
        if changed and ctx.is_main:
            log.warning("resuming with the config's %s instead of the checkpoint's", ", ".join(changed))
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start_iter, trainer_state = int(state["iteration"]), dict(state.get("trainer_state", {}))
        if ctx.is_main:
            log.warning("resuming %s from iteration %d", last_path, start_iter)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "config.yaml")
        log.info("%s", describe(task))
    barrier()

    trainable = task.trainable
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trainable = DistributedDataParallel(task.trainable, device_ids=device_ids)
        task.trainable = trainable

    def evaluate() -> dict[str, float]:
        metrics, _ = evaluate_model(
            task.model, config, val_images, val_ann, batch_size=train_cfg.eval_batch_size, progress=False
        )
        return metrics

    extra = {"class_names": dataset.class_names, "label_to_category_id": dataset.label_to_category_id}
    logger = MetricsLogger(out_dir, train_cfg.log_period, train_cfg.batch_size, progress)
    hooks: list[Hook] = [
        logger,
        EvalHook(train_cfg.eval_period, evaluate, out_dir, logger, extra),
        CheckpointHook(out_dir, train_cfg.checkpoint_period, extra),
        *extra_hooks,
    ]
    loader = build_train_loader(config, dataset, start_iter, ctx.rank, ctx.world_size)
    trainer = Trainer(
        task, trainable, optimizer, scheduler, loader, config, ctx, hooks, start_iter, scaler, amp_dtype
    )
    trainer.state.update(trainer_state)
    trainer.train()
    return trainer.last_metrics
