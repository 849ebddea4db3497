"""Resume equivalence, SIGKILL and full-disk behaviour, and 2-process DDP against one process."""

from __future__ import annotations

import errno
import json
import os
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

from msad_deploy.config import load_config
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


def test_resume_matches_uninterrupted_run_bitwise(data_root: Path, tmp_path: Path) -> None:
    overrides = (
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
    with pytest.raises(OSError, match="No space left"):
        run_training("baseline", config, tmp_path, progress=False)
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
