"""User mistakes through `msad`: one line on stderr, exit 2, no traceback (MSAD_DEBUG=1 shows it)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msad_deploy.cli import main
from msad_deploy.config import Config, InputConfig
from msad_deploy.data.synth import generate_synthetic_coco
from msad_deploy.errors import describe_error
from msad_deploy.models import build_model, save_model_checkpoint
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_errors")
    generate_synthetic_coco(root, num_train=1, num_val=3, image_size=128, seed=4, progress=False)
    return root


def _val_ids(root: Path) -> tuple[int, int]:
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    return data["images"][0]["id"], data["categories"][0]["id"]


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"a": 1}', "expected a JSON list"),
        ('[{"image_id": 1}]', "is not a result dict"),
        ("[{", "is not valid JSON"),
        ("NEG", "negative width or height"),
        ("NAN", "non-finite bbox or score"),
    ],
)
def test_eval_detections_file_is_validated(
    synth_root: Path, tmp_path: Path, capsys, content, expected
) -> None:
    image_id, category_id = _val_ids(synth_root)
    record = {"image_id": image_id, "category_id": category_id, "bbox": [10, 10, 5, 4], "score": 0.5}
    if content == "NEG":
        content = json.dumps([{**record, "bbox": [10, 10, -5, 4]}])
    elif content == "NAN":
        content = json.dumps([{**record, "score": float("nan")}])
    path = tmp_path / "dets.json"
    path.write_text(content)
    assert main(["eval", "--detections", str(path), "--data", str(synth_root)]) == 2
    line = _stderr_line(capsys)
    assert expected in line and str(path) in line


def test_eval_bootstrap_options_are_checked(synth_root: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "dets.json"
    path.write_text("[]")
    for bad in (["--bootstrap", "-1"], ["--bootstrap", "x"], ["--bootstrap-seed", "-3"]):
        with pytest.raises(SystemExit) as stop:
            main(["eval", "--detections", str(path), "--data", str(synth_root), *bad])
        assert stop.value.code == 2
        assert "expected a whole number >= 0" in capsys.readouterr().err


def test_eval_detections_missing_file(synth_root: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.json"
    assert main(["eval", "--detections", str(missing), "--data", str(synth_root)]) == 2
    line = _stderr_line(capsys)
    assert "no such file" in line and str(missing) in line


def _checkpoint(path: Path, num_classes: int, category_ids: list[int] | None = None) -> Path:
    config = Config(
        model=tiny_model_config(num_classes=num_classes),
        input=InputConfig(test_min_size=128, test_max_size=128),
    )
    names = [f"c{i}" for i in range(num_classes)]
    save_model_checkpoint(path, build_model(config.model), config, names, category_ids)
    return path


def test_eval_refuses_model_of_other_classes(synth_root: Path, tmp_path: Path, capsys) -> None:
    ann = synth_root / "annotations" / "instances_val.json"
    three = _checkpoint(tmp_path / "three.pt", 3)
    assert main(["eval", "--model", str(three), "--data", str(synth_root), "--no-progress"]) == 2
    line = _stderr_line(capsys)
    assert "predicts 3 classes" in line and str(three) in line and str(ann) in line
    shifted_ids = _checkpoint(tmp_path / "ids.pt", 8, [100 + i for i in range(8)])
    assert main(["eval", "--model", str(shifted_ids), "--data", str(synth_root), "--no-progress"]) == 2
    assert "category ids" in _stderr_line(capsys)


def test_io_error_is_one_line(synth_root: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = _checkpoint(tmp_path / "m.pt", 8)
    out = blocker / "metrics.json"  # a path below a regular file: the OS refuses it
    code = main(
        ["eval", "--model", str(model), "--data", str(synth_root), "--out", str(out), "--no-progress"]
    )
    assert code == 2
    assert str(blocker) in _stderr_line(capsys)


def test_describe_os_errors() -> None:
    full = describe_error(OSError(errno.ENOSPC, "No space left on device", "runs/a/last.pt"))
    assert full.startswith("no space left on device: runs/a/last.pt") and "free some space" in full
    assert describe_error(OSError(errno.EROFS, "Read-only file system", "/ro/x")).startswith(
        "read-only file system: /ro/x"
    )
    worker = ValueError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback:\n  ...\nDataError: bad x.png"
    )
    assert describe_error(worker) == "bad x.png"


def test_debug_environment_variable_shows_traceback(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "msad_deploy.cli", "eval", "--detections", str(tmp_path / "x.json")]
    args += ["--annotations", str(tmp_path / "a.json"), "--images", str(tmp_path)]
    quiet = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "MSAD_DEBUG": ""})
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "MSAD_DEBUG=1" in quiet.stderr
    loud = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "MSAD_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_plugin_subcommands_are_registered() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "msad_deploy.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "train" in result.stdout
