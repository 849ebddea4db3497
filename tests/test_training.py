"""Each recipe trains a few iterations on generated data; student init, frozen teacher, KD decrease."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from msad_deploy.training.hooks import Hook
from msad_deploy.training.launch import run_training
from msad_deploy.training.tasks import describe_fresh_init, init_student_from_teacher
from msad_deploy.training.trainer import NonFiniteLossError, lr_factor
from torch import nn

from msad_deploy.config import Config, ConfigError, load_config
from msad_deploy.data.synth import generate_synthetic_coco
from msad_deploy.models.build import load_model, load_model_checkpoint
from msad_deploy.models.head import FCOSHead

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "synth_cpu.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_train")
    generate_synthetic_coco(root, num_train=8, num_val=4, image_size=128, seed=1, progress=False)
    return root


def tiny_config(data_root: Path, *overrides: str) -> Config:
    """The CPU preset shrunk to seconds: small model, few iterations, no workers."""
    return load_config(CONFIG, [f"data.root={data_root}", "data.num_workers=0", *_TINY_OVERRIDES, *overrides])


_TINY_OVERRIDES = [
    "model.fpn_channels=32",
    "model.head_channels=32",
    "model.head_num_convs=1",
    "model.head_norm_groups=8",
    "input.train_min_sizes=[96, 128]",
    "train.batch_size=2",
    "train.max_iters=4",
    "train.warmup_iters=2",
    "train.steps=[3]",
    "train.eval_period=4",
    "train.checkpoint_period=2",
    "train.log_period=2",
    "train.eval_batch_size=4",
    "distill.warmup_iters=2",
]


class RecordLosses(Hook):
    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def after_step(self, trainer) -> None:
        self.history.append({k: float(v) for k, v in trainer.last_losses.items()})


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(data_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_training("teacher", tiny_config(data_root), out, progress=False)
    return out


def test_baseline_run_writes_outputs(data_root: Path, tmp_path: Path) -> None:
    recorder = RecordLosses()
    metrics = run_training(
        "baseline", tiny_config(data_root), tmp_path, progress=False, extra_hooks=[recorder]
    )
    assert {"AP", "AP50"} <= set(metrics)
    assert len(recorder.history) == 4
    assert all(math.isfinite(v) for step in recorder.history for v in step.values())
    assert set(recorder.history[0]) == {"loss_cls", "loss_box", "loss_ctr"}
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records if "eval" not in r] == [2, 4]
    assert records[-1]["eval"].keys() >= {"AP", "AP50", "AR100"}
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["iteration"] == 4 and {"optimizer", "scheduler", "rng", "config"} <= set(last)
    model, spec, config, _ = load_model(tmp_path / "best.pt")
    assert last["spec"] == spec.to_dict(), "last.pt and best.pt are written by one function, with the spec"
    assert config.model.arch == "fcos" and config.train.max_iters == 4


def test_teacher_losses_cover_three_branches(teacher_run: Path) -> None:
    records = [r for r in _read_jsonl(teacher_run / "metrics.jsonl") if "eval" not in r]
    names = {k for k in records[0] if k.endswith(("_cls", "_box", "_ctr"))}
    assert names == {f"{b}_loss_{t}" for b in ("hr", "lr", "fused") for t in ("cls", "box", "ctr")}
    assert all(math.isfinite(r["total_loss"]) for r in records)
    payload = load_model_checkpoint(teacher_run / "best.pt")
    assert payload["arch"] == "msad_teacher" and any(k.startswith("fusion.") for k in payload["model"])


@pytest.mark.parametrize("aligned", [True, False])
def test_student_starts_from_teacher_and_keeps_it_frozen(
    data_root: Path, teacher_run: Path, tmp_path: Path, aligned: bool
) -> None:
    teacher_state = load_model_checkpoint(teacher_run / "last.pt")["model"]
    recorder = RecordLosses()

    class CheckStart(Hook):
        def before_train(self, trainer) -> None:
            student = trainer.task.model.state_dict()
            for key, value in student.items():
                torch.testing.assert_close(value, teacher_state[key], msg=key)
            self.teacher_before = {k: v.clone() for k, v in trainer.task.teacher.state_dict().items()}

        def after_train(self, trainer) -> None:
            for key, value in trainer.task.teacher.state_dict().items():
                torch.testing.assert_close(value, self.teacher_before[key], msg=key)
            assert not any(p.requires_grad for p in trainer.task.teacher.parameters())
            assert not trainer.task.teacher.training

    config = tiny_config(
        data_root, f"distill.aligned={str(aligned).lower()}", f"distill.teacher={teacher_run / 'last.pt'}"
    )
    run_training("student", config, tmp_path, progress=False, extra_hooks=[CheckStart(), recorder])
    assert all("loss_kd" in step and math.isfinite(step["loss_kd"]) for step in recorder.history)
    payload = load_model_checkpoint(tmp_path / "best.pt")
    assert payload["arch"] == "fcos"
    assert not any(k.startswith("fusion.") for k in payload["model"]), (
        "the student checkpoint holds no teacher"
    )
    assert payload["config"]["model"]["pyramid_shift"] == (1 if aligned else 0)
    has_p7 = any(k.startswith("fpn.extra.7") for k in payload["model"])
    has_p2 = any(k.startswith("fpn.lateral.2") for k in payload["model"])
    assert (has_p2, has_p7) == ((True, False) if aligned else (False, True))


def test_kd_pulls_student_features_towards_the_teacher(
    data_root: Path, teacher_run: Path, tmp_path: Path
) -> None:
    """Paired against a control from the same init and data: only the KD gradient differs.

    The control keeps a negligible alpha so its KD term still measures the distance to the teacher.
    Without KD the detection loss drifts the features away (distance x2.2 in 20 steps); with KD they
    end at 0.37-0.38 of the control's distance (AVX-512, AVX2 and default kernels, 1 or 2 threads).
    The bound asks for half that effect, not for a drop of the noisy per-batch KD value itself
    (14 % on one CPU, 25 % on another: too close to any fixed threshold).
    """
    distance = {}
    for name, alpha in (("kd", "0.2"), ("control", "0.000001")):
        recorder = RecordLosses()
        config = tiny_config(
            data_root,
            f"distill.teacher={teacher_run / 'last.pt'}",
            f"distill.alpha={alpha}",
            "distill.warmup_iters=0",
            "train.max_iters=20",
            "train.warmup_iters=0",
            "train.steps=[100]",
            "train.eval_period=100",
            "train.checkpoint_period=100",
            "train.base_lr=0.02",
        )
        run_training("student", config, tmp_path / name, progress=False, extra_hooks=[recorder])
        distance[name] = [step["loss_kd"] / float(alpha) for step in recorder.history]
    kd, control = distance["kd"], distance["control"]
    assert kd[0] == pytest.approx(control[0], rel=1e-4), "both runs start from the same weights and batch"
    assert sum(kd[-3:]) < 0.7 * sum(control[-3:]), (kd, control)


def test_student_rejects_wrong_teachers(data_root: Path, tmp_path: Path) -> None:
    baseline_dir = tmp_path / "baseline"
    run_training(
        "baseline",
        tiny_config(data_root, "train.max_iters=1", "train.eval_period=0"),
        baseline_dir,
        progress=False,
    )
    with pytest.raises(ConfigError, match="not an aligned multi-scale teacher"):
        run_training(
            "student", tiny_config(data_root, f"distill.teacher={baseline_dir / 'last.pt'}"), tmp_path / "s1"
        )
    with pytest.raises(ConfigError, match="needs a teacher checkpoint"):
        run_training("student", tiny_config(data_root), tmp_path / "s2")


def test_student_rejects_teacher_of_other_class_count_or_architecture(
    data_root: Path, teacher_run: Path, tmp_path: Path
) -> None:
    payload = load_model_checkpoint(teacher_run / "last.pt")
    payload["config"]["model"]["num_classes"] = 3
    odd = tmp_path / "odd_classes.pt"
    torch.save(payload, odd)
    with pytest.raises(ConfigError, match="predicts 3 classes"):
        run_training("student", tiny_config(data_root, f"distill.teacher={odd}"), tmp_path / "s1")
    narrow_fpn = tiny_config(data_root, f"distill.teacher={teacher_run / 'last.pt'}", "model.fpn_channels=16")
    with pytest.raises(ValueError, match=r"does not match the student's backbone/FPN .*fpn\."):
        run_training("student", narrow_fpn, tmp_path / "s2")
    # With init_from_teacher off, any architecture trains (KD needs equal FPN widths, so keep those).
    run_training(
        "student",
        tiny_config(
            data_root,
            f"distill.teacher={teacher_run / 'last.pt'}",
            "model.head_channels=16",
            "distill.init_from_teacher=false",
            "train.max_iters=1",
            "train.eval_period=0",
        ),
        tmp_path / "s3",
        progress=False,
    )


def test_student_with_a_lighter_head_starts_from_the_teacher_where_shapes_match(
    data_root: Path, teacher_run: Path, tmp_path: Path, caplog
) -> None:
    """A lighter student head (16 channels vs the teacher's 32): backbone and FPN come from the
    teacher, the head tensors whose shape differs keep their fresh init, and one line says so."""
    teacher_state = load_model_checkpoint(teacher_run / "last.pt")["model"]
    seen = {}

    class CheckStart(Hook):
        def before_train(self, trainer) -> None:
            seen.update({k: v.clone() for k, v in trainer.task.model.state_dict().items()})

    config = tiny_config(
        data_root,
        f"distill.teacher={teacher_run / 'last.pt'}",
        "model.head_channels=16",
        "train.max_iters=1",
        "train.eval_period=0",
    )
    with caplog.at_level("INFO", logger="msad.train"):
        run_training("student", config, tmp_path, progress=False, extra_hooks=[CheckStart()])
    fresh = {k for k, v in seen.items() if v.shape != teacher_state[k].shape}
    assert fresh == {
        f"head.{tower}.{i}.{p}"
        for tower in ("cls_tower", "box_tower")
        for i in (0, 1)
        for p in ("weight", "bias")
    } | {"head.cls_logits.weight", "head.box_pred.weight", "head.centerness.weight"}
    for key, value in seen.items():
        if key not in fresh:
            torch.testing.assert_close(value, teacher_state[key], rtol=0, atol=0, msg=key)
    lines = [r.getMessage() for r in caplog.records if "keep their fresh init" in r.getMessage()]
    assert len(lines) == 1 and f"{len(fresh)} head tensors" in lines[0]
    assert all(key in lines[0] for key in fresh) and "backbone." not in lines[0]


class _Tiny(nn.Module):
    """Backbone + FPN + FCOS head stand-ins small enough to check tensor by tensor."""

    def __init__(self, head_channels: int, head_convs: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.fpn = nn.Conv2d(4, 4, 1)
        self.head = FCOSHead(4, 2, channels=head_channels, num_convs=head_convs, num_levels=2, norm_groups=2)


def _filled(module: nn.Module, start: float) -> dict[str, torch.Tensor]:
    """Give every tensor distinct values (start, start + 1, ...) so a copy is told from a fresh init."""
    state = {}
    for i, (key, value) in enumerate(module.state_dict().items()):
        state[key] = torch.full_like(value, start + i)
    module.load_state_dict(state)
    return {k: v.clone() for k, v in state.items()}


def test_init_student_from_teacher_copies_equal_shapes_and_keeps_the_rest_fresh() -> None:
    teacher = _filled(_Tiny(head_channels=8, head_convs=2), 100.0)
    # Narrower head (4 channels, 1 conv): only the backbone, FPN, output biases and scales match.
    student = _Tiny(head_channels=4, head_convs=1)
    before = _filled(student, -100.0)
    copied, fresh = init_student_from_teacher(student, teacher, "teacher.pt")
    after = student.state_dict()
    matching = {k for k in before if k in teacher and teacher[k].shape == before[k].shape}
    assert set(copied) == matching and set(fresh) == set(before) - matching
    assert {k.split(".")[0] for k in fresh} == {"head"}
    assert set(fresh) == {
        f"head.{tower}.{i}.{p}"
        for tower in ("cls_tower", "box_tower")
        for i in (0, 1)
        for p in ("weight", "bias")
    } | {"head.cls_logits.weight", "head.box_pred.weight", "head.centerness.weight"}
    assert {"backbone.1.running_mean", "fpn.weight", "head.cls_logits.bias", "head.scales.1.scale"} <= set(
        copied
    )
    for key in copied:
        torch.testing.assert_close(after[key], teacher[key], rtol=0, atol=0, msg=key)
    for key in fresh:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    line = describe_fresh_init(student, teacher, "teacher.pt", copied, fresh)
    assert (
        f"{len(copied)} of {len(before)} tensors copied" in line
        and "head.cls_tower.0.weight (4, 4, 3, 3)" in line
    )
    assert "vs teacher (8, 4, 3, 3)" in line and "\n" not in line

    # Same width, one conv fewer: the first tower conv has the teacher's shape and is copied, the
    # teacher's second conv is left behind, and nothing stays fresh.
    shallow = _Tiny(head_channels=8, head_convs=1)
    copied, fresh = init_student_from_teacher(shallow, teacher, "teacher.pt")
    assert fresh == [] and "head.cls_tower.0.weight" in copied and "head.cls_tower.3.weight" not in copied
    torch.testing.assert_close(
        shallow.state_dict()["head.cls_tower.0.weight"], teacher["head.cls_tower.0.weight"]
    )

    # Backbone or FPN of another shape (or missing in the teacher): a clear error, the student untouched.
    wide = _Tiny(head_channels=8, head_convs=2)
    wide.fpn = nn.Conv2d(4, 6, 1)
    untouched = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"teacher\.pt does not match the student's backbone/FPN \(2 tensors.*fpn\.weight \(6, 4, 1, 1\) vs teacher \(4, 4, 1, 1\)",
    ):
        init_student_from_teacher(wide, teacher, "teacher.pt")
    for key, value in wide.state_dict().items():
        torch.testing.assert_close(value, untouched[key], rtol=0, atol=0, msg=key)
    partial = {k: v for k, v in teacher.items() if k != "backbone.0.bias"}
    with pytest.raises(ValueError, match=r"backbone\.0\.bias \(4,\) vs teacher missing"):
        init_student_from_teacher(_Tiny(head_channels=8, head_convs=2), partial, "teacher.pt")


def test_class_count_mismatch_and_existing_run(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set model.num_classes=8"):
        run_training("baseline", tiny_config(data_root, "model.num_classes=80"), tmp_path / "a")
    run_training(
        "baseline",
        tiny_config(data_root, "train.max_iters=1", "train.eval_period=0"),
        tmp_path / "b",
        progress=False,
    )
    with pytest.raises(FileExistsError, match="--resume"):
        run_training("baseline", tiny_config(data_root), tmp_path / "b")


@pytest.fixture
def damaged_root(data_root: Path, tmp_path: Path) -> Path:
    """The module's dataset with train image 000003.png empty and val image 000001.png text."""
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(data_root, root)
    (root / "train" / "000003.png").write_bytes(b"")
    (root / "val" / "000001.png").write_text("not a png\n")
    return root


def test_unreadable_images_met_while_training_and_evaluating_are_skipped(
    damaged_root: Path, tmp_path: Path
) -> None:
    config = tiny_config(damaged_root, "data.on_bad=skip", "train.checkpoint_period=0")
    with pytest.warns(UserWarning) as record:
        metrics = run_training("baseline", config, tmp_path / "run", progress=False)
    messages = [str(w.message) for w in record]
    assert any("train/000003.png" in m and "next readable image" in m for m in messages), messages
    assert any("val/000001.png" in m and "left out of the evaluation" in m for m in messages), messages
    assert math.isfinite(metrics["AP50"])


def test_verify_images_drops_unreadable_images_before_training(damaged_root: Path, tmp_path: Path) -> None:
    import os

    config = tiny_config(
        damaged_root,
        "data.on_bad=skip",
        "data.verify_images=true",
        "train.max_iters=1",
        "train.eval_period=1",
        "train.checkpoint_period=0",
    )
    with pytest.warns(UserWarning, match="unreadable_image") as record:
        run_training("baseline", config, tmp_path / "run", progress=False)
    messages = [str(w.message) for w in record]
    assert any("train/000003.png" in m for m in messages) and any("val/000001.png" in m for m in messages)
    assert not any("next readable image" in m or "left out of the evaluation" in m for m in messages)
    assert list((Path(os.environ["MSAD_CACHE_DIR"]) / "verify").glob("*.json"))


def test_unreadable_image_in_a_worker_stops_cli_training_with_one_line(
    damaged_root: Path, tmp_path: Path, capsys
) -> None:
    from msad_deploy.cli import main

    args = ["train", "baseline", "--config", str(CONFIG), "--out", str(tmp_path / "run"), "--no-progress"]
    overrides = [f"data.root={damaged_root}", "data.num_workers=1", *_TINY_OVERRIDES]
    assert main([*args, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("msad train: error: cannot decode image ") and "train/000003.png" in line
    assert "data.on_bad=skip" in line and "data.verify_images=true" in line


def test_nan_loss_stops_with_iteration_and_term(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    from msad_deploy.training import tasks

    original = tasks.BaselineTask.losses

    def poisoned(self, batch, iteration):
        losses = original(self, batch, iteration)
        if iteration == 3:
            losses["loss_box"] = losses["loss_box"] * float("nan")
        return losses

    monkeypatch.setattr(tasks.BaselineTask, "losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: \{'loss_box': nan\}"):
        run_training("baseline", tiny_config(data_root, "train.max_iters=6"), tmp_path, progress=False)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["iteration"] == 2  # the checkpoint before the bad step survives


def test_lr_schedule() -> None:
    config = load_config(
        None, ["train.base_lr=1", "train.warmup_iters=10", "train.warmup_factor=0.1", "train.steps=[20, 30]"]
    )
    train = config.train
    assert lr_factor(0, train) == pytest.approx(0.1)
    assert lr_factor(5, train) == pytest.approx(0.55)
    assert (
        lr_factor(10, train) == 1.0
        and lr_factor(20, train) == pytest.approx(0.1)
        and lr_factor(30, train) == pytest.approx(0.01)
    )
    train.schedule, train.warmup_iters, train.max_iters = "cosine", 0, 100
    assert lr_factor(50, train) == pytest.approx(0.5) and lr_factor(100, train) == pytest.approx(0.0)


def test_optimizer_choice_keeps_normalisation_out_of_weight_decay() -> None:
    from msad_deploy.training.trainer import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    for name, kind in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        train = load_config(None, [f"train.optimizer={name}", "train.weight_decay=0.05"]).train
        optimizer = build_optimizer(model, train)
        assert type(optimizer) is kind
        decay, no_decay = optimizer.param_groups
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        assert [p.shape for p in no_decay["params"]] == [(4,), (4,)]  # GroupNorm weight and bias
    train = load_config(None, ["train.optimizer=adam"]).train
    with pytest.raises(ValueError, match=r"train.optimizer must be one of \('sgd', 'adamw'\), got 'adam'"):
        build_optimizer(model, train)
