"""Resume equivalence, SIGKILL and full-disk behaviour, and 2-process DDP against one process."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from msad_deploy.training.hooks import Hook
from msad_deploy.training.launch import run_training
from msad_deploy.training.trainer import DivergenceError

from msad_deploy.config import ConfigError, load_config
from msad_deploy.data.synth import generate_synthetic_coco
from msad_deploy.models.build import build_model
from tests.test_training import tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_faults")
    generate_synthetic_coco(root, num_train=8, num_val=2, image_size=128, seed=2, progress=False)
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


class Interrupt(Hook):
    """Simulates a crash right after the step ``at`` (and its checkpoint) completes."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self, trainer) -> None:
        if trainer.iteration + 1 == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_matches_uninterrupted_run_bitwise(data_root: Path, tmp_path: Path, optimizer: str) -> None:
    overrides = (
        f"train.optimizer={optimizer}",
        "train.deterministic=true",
        "train.max_iters=6",
        "train.checkpoint_period=2",
        "train.eval_period=6",
    )
    run_training("baseline", tiny_config(data_root, *overrides), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_training(
            "baseline",
            tiny_config(data_root, *overrides),
            tmp_path / "split",
            progress=False,
            extra_hooks=[Interrupt(4)],
        )
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["iteration"] == 4
    run_training(
        "baseline", tiny_config(data_root, *overrides), tmp_path / "split", resume=True, progress=False
    )
    straight, resumed = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "split" / "last.pt")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # another optimizer cannot take over the saved state: a clear error naming the run and the fix
    other = "sgd" if optimizer == "adamw" else "adamw"
    switched = tiny_config(data_root, *overrides, "train.max_iters=8", f"train.optimizer={other}")
    with pytest.raises(ConfigError, match=rf"split/last\.pt was trained with train\.optimizer={optimizer}"):
        run_training("baseline", switched, tmp_path / "split", resume=True, progress=False)


def test_full_disk_never_corrupts_last_checkpoint(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    from msad_deploy.models import build

    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_disk(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint: write part of it, then the disk is full
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(build.torch, "save", save_then_fill_disk)
    config = tiny_config(data_root, "train.max_iters=6", "train.checkpoint_period=2", "train.eval_period=0")
    with pytest.raises(OSError, match=r"no space left on device while writing .*last\.pt") as excinfo:
        run_training("baseline", config, tmp_path, progress=False)
    assert excinfo.value.errno == errno.ENOSPC and str(tmp_path) in str(excinfo.value)
    monkeypatch.setattr(build.torch, "save", real_save)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 2
    assert not list(tmp_path.glob("*.tmp"))


def _cli(out: Path, data_root: Path, *overrides: str) -> list[str]:
    config = tiny_config(data_root)  # same shrunk preset, passed as overrides to the CLI
    args = [
        "baseline",
        "--config",
        str(Path(__file__).resolve().parent.parent / "configs" / "synth_cpu.yaml"),
        "--out",
        str(out),
        "--no-progress",
        f"data.root={data_root}",
        "data.num_workers=0",
        f"model.fpn_channels={config.model.fpn_channels}",
        f"model.head_channels={config.model.head_channels}",
        "model.head_num_convs=1",
        "model.head_norm_groups=8",
        "train.warmup_iters=2",
        "train.steps=[100]",
        *overrides,
    ]
    return args


def test_sigkill_loses_at_most_one_checkpoint_interval(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = _cli(
        out,
        data_root,
        "train.batch_size=2",
        "train.max_iters=40",
        "train.checkpoint_period=3",
        "train.log_period=1",
        "train.eval_period=0",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "msad_deploy.training", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    logged = 0
    while time.time() < deadline and process.poll() is None:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            logged = json.loads(lines[-1])["iteration"] if lines else 0
            if logged >= 8:
                break
        time.sleep(0.2)
    assert process.poll() is None, "training finished or died before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    logged = json.loads(metrics.read_text().splitlines()[-1])["iteration"]
    saved = torch.load(out / "last.pt", weights_only=True)["iteration"]
    assert logged - saved <= 3, (logged, saved)
    resumed = subprocess.run(
        [sys.executable, "-m", "msad_deploy.training", *args, "--resume", "train.max_iters=12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_ddp_matches_single_process(data_root: Path, tmp_path: Path) -> None:
    # Frozen BN: per-rank batch statistics would otherwise differ from the global batch's by design.
    common = (
        "model.backbone_norm=frozen_bn",
        "train.batch_size=4",
        "train.max_iters=3",
        "train.eval_period=3",
        "train.base_lr=0.02",
    )
    single = subprocess.run(
        [sys.executable, "-m", "msad_deploy.training", *_cli(tmp_path / "single", data_root, *common)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [*torchrun, "-m", "msad_deploy.training", *_cli(tmp_path / "ddp", data_root, *common)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _weights(tmp_path / "single" / "last.pt"), _weights(tmp_path / "ddp" / "last.pt")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4, msg=key)
    # The comparison means something only if training moved the weights away from the shared init.
    config = load_config(
        None, [f"model.{k}" for k in ("num_classes=8", "backbone=resnet18", "backbone_norm=frozen_bn")]
    )
    config.model.fpn_channels, config.model.head_channels, config.model.head_num_convs = 32, 32, 1
    config.model.head_norm_groups = 8
    torch.manual_seed(0)
    initial = build_model(config.model).state_dict()
    assert any(not torch.equal(initial[k], one[k]) for k in one if k.startswith("head."))
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in record for record in ddp_log), "sharded evaluation was gathered and logged"


# --- divergence ------------------------------------------------------------------------------


class Snapshot(Hook):
    """The model weights after every step, keyed by the number of steps done."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def after_step(self, trainer) -> None:
        state = trainer.task.model.state_dict()
        self.weights[trainer.iteration + 1] = {k: v.detach().clone() for k, v in state.items()}


def _max_abs(weights: dict[str, torch.Tensor]) -> float:
    return max(float(v.abs().max()) for v in weights.values() if v.is_floating_point())


def _assert_sane_checkpoints(out: Path) -> None:
    """Every checkpoint on disk is finite and far from blown up (healthy tiny models: max |w| ~5)."""
    for path in out.glob("*.pt"):
        weights = _weights(path)
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), path.name
        assert _max_abs(weights) < 100, path.name


def test_learning_rate_blow_up_stops_before_the_damage_is_kept(data_root: Path, tmp_path: Path) -> None:
    """lr 0.01 for 3 steps, then 1000 (a step schedule with gamma 1e5): the update of step 3 wrecks
    the weights (max |w| ~5 -> ~870), step 4's loss explodes. last.pt of iteration 4 holds the wrecked
    weights and is discarded; prev.pt (iteration 3) takes its place and resumes with a sane lr."""
    snapshot = Snapshot()
    overrides = ("train.eval_period=0", "train.checkpoint_period=1", "train.base_lr=0.01")
    config = tiny_config(
        data_root, *overrides, "train.max_iters=8", "train.steps=[3]", "train.gamma=100000.0"
    )
    with pytest.raises(DivergenceError) as excinfo:
        run_training("baseline", config, tmp_path, progress=False, extra_hooks=[snapshot])
    message = str(excinfo.value)
    assert excinfo.value.iteration == 4
    assert re.search(r"diverged at iteration 4: (loss_\w+ = |the gradient norm )", message), message
    assert "--resume" in message and "train.base_lr (now 0.01)" in message and "clip_grad_norm" in message
    assert "last.pt (iteration 4) held the weights that diverged" in message
    assert _max_abs(snapshot.weights[4]) > 100 > 20 * _max_abs(snapshot.weights[3])  # ~870 vs ~5
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt"]
    _assert_sane_checkpoints(tmp_path)
    restored = torch.load(tmp_path / "last.pt", weights_only=True)
    assert restored["iteration"] == 3
    for key, value in snapshot.weights[3].items():
        assert torch.equal(restored["model"][key], value), key

    sane = tiny_config(data_root, *overrides, "train.max_iters=6", "train.steps=[100]")
    run_training("baseline", sane, tmp_path, resume=True, progress=False)
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    assert resumed["iteration"] == 6 and torch.load(tmp_path / "prev.pt", weights_only=True)["iteration"] == 5
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    _assert_sane_checkpoints(tmp_path)


def _growing(monkeypatch, term: str, start: int, rate: float) -> None:
    """From iteration ``start`` on, multiply loss ``term`` by rate ** (iteration - start + 1)."""
    from msad_deploy.training import tasks

    original = tasks.BaselineTask.losses

    def grown(self, batch, iteration):
        losses = original(self, batch, iteration)
        if iteration >= start:
            losses[term] = losses[term] * rate ** (iteration - start + 1)
        return losses

    monkeypatch.setattr(tasks.BaselineTask, "losses", grown)


def test_exploding_finite_loss_names_the_term(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    # loss_box (<= ~1) x10, x100, x1000 from iteration 3 against a total of ~2.5: the total is ~4x,
    # ~35x, then ~400x its median, so the 100x bound trips at iteration 5 with margin on both sides.
    _growing(monkeypatch, "loss_box", start=3, rate=10.0)
    config = tiny_config(
        data_root, "train.max_iters=8", "train.eval_period=0", "train.divergence_grad_factor=0"
    )
    with pytest.raises(DivergenceError, match=r"diverged at iteration 5: loss_box = [\d.e+]+ ") as excinfo:
        run_training("baseline", config, tmp_path, progress=False)
    assert "train.divergence_factor=100" in str(excinfo.value)
    # last.pt (iteration 4) holds the weights whose loss at iteration 4 passed; it is kept and named.
    assert "Continue from" in str(excinfo.value) and "(iteration 4, before the divergence)" in str(
        excinfo.value
    )
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 4
    _assert_sane_checkpoints(tmp_path)


@pytest.mark.parametrize("kind", ["explodes", "nan"])
def test_gradient_norm_divergence_stops_before_the_update(
    data_root: Path, tmp_path: Path, monkeypatch, kind: str
) -> None:
    snapshot = Snapshot()
    if kind == "explodes":
        # The whole loss x30, x900 from iteration 2: the gradient norm follows (the loss check is off).
        _growing(monkeypatch, "loss_cls", start=2, rate=30.0)
        _growing(monkeypatch, "loss_box", start=2, rate=30.0)
        _growing(monkeypatch, "loss_ctr", start=2, rate=30.0)
        expected, at = r"the gradient norm [\d.e+]+ is [\d.e+]+x its median", 3
    else:
        from msad_deploy.training import tasks

        original = tasks.BaselineTask.losses

        def nan_gradient(self, batch, iteration):
            losses = original(self, batch, iteration)
            if iteration == 2:  # finite loss, NaN gradient for the classifier's bias
                self.model.head.cls_logits.bias.register_hook(lambda grad: grad * float("nan"))
            return losses

        monkeypatch.setattr(tasks.BaselineTask, "losses", nan_gradient)
        expected, at = r"non-finite gradient norm \(nan\) while the loss terms were finite", 2
    config = tiny_config(
        data_root,
        "train.max_iters=6",
        "train.eval_period=0",
        "train.checkpoint_period=1",
        "train.divergence_factor=0",
    )
    with pytest.raises(DivergenceError, match=rf"iteration {at}: {expected}"):
        run_training("baseline", config, tmp_path, progress=False, extra_hooks=[snapshot])
    # The diverging step was never applied: last.pt (discarded, its weights produced it) gave way
    # to prev.pt, which holds the weights after at - 1 steps.
    assert max(snapshot.weights) == at
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["iteration"] == at - 1
    for key, value in snapshot.weights[at - 1].items():
        assert torch.equal(last["model"][key], value), key


def test_non_finite_weights_are_never_written(data_root: Path, tmp_path: Path) -> None:
    """A NaN running mean does not touch the training loss (train-mode BN uses batch statistics),
    so only the check before a checkpoint can catch it."""

    class PoisonRunningMean(Hook):
        def after_step(self, trainer) -> None:
            if trainer.iteration + 1 == 3:
                bn = next(m for m in trainer.task.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
                bn.running_mean.fill_(float("nan"))

    config = tiny_config(data_root, "train.max_iters=6", "train.eval_period=0", "train.checkpoint_period=2")
    with pytest.raises(
        DivergenceError, match=r"non-finite weights after iteration 4 \(e\.g\. \['backbone\."
    ) as excinfo:
        run_training("baseline", config, tmp_path, progress=False, extra_hooks=[PoisonRunningMean()])
    assert "no checkpoint was written from them" in str(excinfo.value)
    assert "Continue from" in str(excinfo.value) and "(iteration 2, before the divergence)" in str(
        excinfo.value
    )
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 2
    _assert_sane_checkpoints(tmp_path)


def test_normal_run_keeps_the_previous_checkpoint(data_root: Path, tmp_path: Path) -> None:
    config = tiny_config(data_root, "train.max_iters=4", "train.eval_period=0", "train.checkpoint_period=1")
    run_training("baseline", config, tmp_path, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 4
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["iteration"] == 3
    assert not list(tmp_path.glob("*.tmp"))


# --- checkpoint I/O errors -------------------------------------------------------------------

TORCH_ZIP_FAILURE = "[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1002"


@pytest.mark.parametrize("free_bytes", [0, 10 * 2**30])
def test_torch_zip_writer_failure_becomes_an_oserror_naming_the_path(
    tmp_path: Path, monkeypatch, free_bytes: int
) -> None:
    """torch's zip writer loses the errno of a full disk; free space tells ENOSPC from other causes."""
    from msad_deploy.models import build

    path = tmp_path / "runs" / "last.pt"
    build.atomic_save({"iteration": 1}, path)

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError(TORCH_ZIP_FAILURE)

    monkeypatch.setattr(build.torch, "save", failing_save)
    monkeypatch.setattr(
        build.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1 << 40, 0, free_bytes)
    )
    with pytest.raises(OSError) as excinfo:
        build.atomic_save({"iteration": 2}, path, previous=path.with_name("prev.pt"))
    if free_bytes == 0:
        assert excinfo.value.errno == errno.ENOSPC
        assert str(excinfo.value) == (
            f"[Errno 28] no space left on device while writing {path}; free space or choose another --out"
        )
    else:
        assert excinfo.value.errno == errno.EIO
        assert str(excinfo.value).endswith(f"could not write {path}: {TORCH_ZIP_FAILURE}")
    assert isinstance(excinfo.value.__cause__, RuntimeError)
    assert torch.load(path, weights_only=True) == {"iteration": 1}  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no tmp, no prev


@pytest.mark.parametrize(
    "code, message",
    [(errno.EROFS, "read-only file system: cannot write"), (errno.EACCES, "permission denied: cannot write")],
)
def test_read_only_directory_error_names_the_path(
    tmp_path: Path, monkeypatch, code: int, message: str
) -> None:
    """As on a read-only mount or a directory without write permission (chmod cannot stop root, who
    runs these tests in CI): opening the temporary file fails."""
    from msad_deploy.models import build

    path = tmp_path / "last.pt"
    build.atomic_save({"iteration": 1}, path)

    def read_only_open(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(code, os.strerror(code), str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(build, "open", read_only_open, raising=False)
    with pytest.raises(OSError, match=rf"{message} {re.escape(str(path))}; choose another --out") as excinfo:
        build.atomic_save({"iteration": 2}, path)
    assert excinfo.value.errno == code
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert not path.with_name("last.pt.tmp").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o555 directory anyway")
def test_unwritable_directory_error_names_the_path(tmp_path: Path) -> None:
    from msad_deploy.models import build

    path = tmp_path / "out" / "last.pt"
    build.atomic_save({"iteration": 1}, path)
    path.parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=rf"permission denied: cannot write {re.escape(str(path))}"):
            build.atomic_save({"iteration": 2}, path)
    finally:
        path.parent.chmod(0o755)
    assert torch.load(path, weights_only=True) == {"iteration": 1}


def test_previous_checkpoint_is_copied_where_hard_links_fail(tmp_path: Path, monkeypatch) -> None:
    from msad_deploy.models import build

    path, previous = tmp_path / "last.pt", tmp_path / "prev.pt"
    build.atomic_save({"iteration": 1}, path, previous=previous)
    assert not previous.exists()

    def no_links(*args):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(build.os, "link", no_links)
    build.atomic_save({"iteration": 2}, path, previous=previous)
    build.atomic_save({"iteration": 3}, path, previous=previous)
    assert torch.load(path, weights_only=True) == {"iteration": 3}
    assert torch.load(previous, weights_only=True) == {"iteration": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


def test_stale_temporary_checkpoints_are_removed_at_start(data_root: Path, tmp_path: Path, caplog) -> None:
    for name in ("last.pt.tmp", "prev.pt.tmp", "best.pt.tmp"):
        (tmp_path / name).write_bytes(b"half a checkpoint from a killed run")
    config = tiny_config(data_root, "train.max_iters=1", "train.eval_period=0")
    with caplog.at_level("WARNING", logger="msad.train"):
        run_training("baseline", config, tmp_path, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    assert sum("partial checkpoint left by an interrupted run" in r.message for r in caplog.records) == 3
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 1


@pytest.mark.slow
def test_two_process_ddp_divergence_stops_every_rank(data_root: Path, tmp_path: Path) -> None:
    """The guard's decision is all-reduced: both ranks stop at the same iteration, none hangs."""
    args = _cli(
        tmp_path / "ddp",
        data_root,
        "model.backbone_norm=frozen_bn",
        "train.batch_size=4",
        "train.max_iters=8",
        "train.eval_period=0",
        "train.checkpoint_period=1",
        "train.steps=[3]",
        "train.gamma=100000.0",  # lr 0.01 -> 1000 at iteration 3
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    ddp = subprocess.run(
        [*torchrun, "--master-port", str(_free_port()), "-m", "msad_deploy.training", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode != 0
    errors = [line for line in ddp.stderr.splitlines() if line.startswith("msad train: error:")]
    assert len(errors) == 2 and all(
        re.search(r"(diverged|non-finite loss) at iteration 4: ", e) for e in errors
    ), errors
    assert sum("held the weights that diverged" in line for line in errors) == 1  # rank 0 handles files
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["iteration"] == 3
