"""The runtime's CUDA paths on a GPU, against eager PyTorch: eager fp32 vs the CPU, torch.compile, CUDA
graphs (two input shapes, replayed), channels_last, bf16 / fp16 autocast, an AOTInductor CUDA package,
and 8 threads on one CUDA Detector.

The model is a tiny MSAD student (resnet18, input shift 1) trained for a few hundred iterations on
generated scenes (one or two flat-coloured squares on dark noise, the class is the colour), so that
its detections are confident and its top-1 class on a clear image is unambiguous.

The fp32 comparisons run with TF32 off (``torch.backends.cudnn.allow_tf32``, on by default, rounds
convolution inputs to 10 mantissa bits, and eager and compiled code pick different algorithms): they
check the code paths, not TF32's rounding. Needs torch, torchvision and numpy only (no pycocotools,
onnx, TensorRT or fastapi); the AOTInductor piece needs the project installed (``msad_deploy.export``,
e.g. ``pip install --no-deps -e .``) and is skipped with that reason otherwise. Run with
``pytest -m gpu tests/test_runtime_cuda.py``; about three minutes on an H100, most of it compiling
(torch.compile twice, the AOTInductor package once).

Seen on an H100 with torch 2.11.0+cu130 (2026-11): every check passed except the AOTInductor one,
whose package that torch build cannot load (``aoti_load_package`` segfaults, even for a one-op CPU
package), so that check runs in a child process and fails naming the crash.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msad_deploy.config import Config, InputConfig
from msad_deploy.data.transforms import normalize_images
from msad_deploy.models import build_model, compute_fcos_targets, fcos_losses, save_model_checkpoint
from msad_deploy.models.pyramid import level_shapes, make_lr_batch, pyramid_levels
from msad_deploy.runtime import Detector, Result
from tests.conftest import tiny_model_config
from tests.runtime_fixtures import run_in_threads

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # torch.compile / Inductor notices
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.script_method, via torchvision
]

CLASSES = ["red", "green", "blue", "yellow"]
COLOURS = torch.tensor([(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40)], dtype=torch.uint8)
TRAIN_ITERS = 300
CLEAR = 4  # the first CLEAR test images hold one square: an unambiguous top-1 detection


def _scene(generator: torch.Generator, height: int = 128, width: int = 128, objects: int | None = None):
    """uint8 [3, H, W] dark noise with 1-2 coloured squares; their boxes [N, 4] xyxy and labels [N]."""
    image = torch.randint(0, 60, (3, height, width), dtype=torch.uint8, generator=generator)
    count = objects or int(torch.randint(1, 3, (1,), generator=generator))
    boxes, labels = [], []
    for _ in range(count):
        size = int(torch.randint(24, 64, (1,), generator=generator))
        y = int(torch.randint(0, height - size, (1,), generator=generator))
        x = int(torch.randint(0, width - size, (1,), generator=generator))
        label = int(torch.randint(0, len(CLASSES), (1,), generator=generator))
        image[:, y : y + size, x : x + size] = COLOURS[label][:, None, None]
        boxes.append([x, y, x + size, y + size])
        labels.append(label)
    return image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


@pytest.fixture(scope="module", autouse=True)
def _full_fp32():
    """TF32 off for the module (restored after): fp32 comparisons check code paths, not TF32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny student (test size 128, at most 256) trained on CUDA for TRAIN_ITERS iterations."""
    config = Config(
        model=tiny_model_config(num_classes=len(CLASSES), pyramid_shift=1),
        input=InputConfig(test_min_size=128, test_max_size=256),
    )
    torch.manual_seed(0)
    model = build_model(config.model).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    shapes = level_shapes(128, 128, pyramid_levels(0))  # HR levels P3..P7 = the student's P2..P6
    for _ in range(TRAIN_ITERS):
        items = [_scene(generator) for _ in range(16)]
        images = torch.stack([image for image, _, _ in items]).cuda()
        hr = normalize_images(images, config.input.pixel_mean, config.input.pixel_std)
        inputs = make_lr_batch(hr, 1, config.input.lr_mode)
        targets = compute_fcos_targets(
            [boxes.cuda() for _, boxes, _ in items], [labels.cuda() for _, _, labels in items], shapes
        )
        loss = sum(fcos_losses(model(inputs), targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("cuda_runtime") / "student.pt"
    save_model_checkpoint(path, model.cpu().eval(), config, CLASSES, [1, 2, 3, 4])
    return path


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """uint8 [H, W, 3]: four clear 128x128 scenes of one square each (padded HR frame 128x128), then two
    128x256 scenes of two squares (128x256)."""
    generator = torch.Generator().manual_seed(7)
    square = [_scene(generator, objects=1)[0] for _ in range(CLEAR)]
    wide = [_scene(generator, 128, 256, objects=2)[0] for _ in range(2)]
    return [image.permute(1, 2, 0).contiguous().numpy() for image in square + wide]


@pytest.fixture(scope="module")
def eager(checkpoint, images) -> list[Result]:
    """The CUDA eager fp32 results every other path is compared with."""
    with Detector.load(checkpoint, device="cuda") as detector:
        results = detector(images)
    assert sum(len(r) for r in results) >= len(images), "the trained model should detect the squares"
    return results


def assert_same(
    ours: list[Result], reference: list[Result], what: str, box_tol: float, score_tol: float
) -> None:
    """The same detections per image as sets: same class, box within box_tol px, score within score_tol."""
    assert len(ours) == len(reference), f"{what}: {len(ours)} results for {len(reference)} images"
    for index, (a, b) in enumerate(zip(ours, reference)):
        if len(a) != len(b):
            raise AssertionError(
                f"{what}, image {index}: {len(a)} detections vs {len(b)} in the reference\n"
                f"  ours:      {_listing(a)}\n  reference: {_listing(b)}"
            )
        used = np.zeros(len(b), dtype=bool)
        for box, score, label in zip(a.boxes, a.scores, a.class_ids):
            fits = ~used & (b.class_ids == label) & (np.abs(b.scores - score) <= score_tol)
            fits &= np.abs(b.boxes - box).max(axis=1) <= box_tol
            if not fits.any():
                raise AssertionError(
                    f"{what}, image {index}: no reference detection of class {label} within {box_tol} px / "
                    f"score {score_tol} for box {np.round(box, 3).tolist()} score {score:.5f}\n"
                    f"  ours:      {_listing(a)}\n  reference: {_listing(b)}"
                )
            used[np.flatnonzero(fits)[0]] = True


def _listing(result: Result, top: int = 5) -> str:
    rows = zip(result.class_ids[:top], result.scores[:top], result.boxes[:top])
    shown = ", ".join(f"{c}@{s:.4f} {np.round(b, 2).tolist()}" for c, s, b in rows)
    return shown + (f" (+{len(result) - top})" if len(result) > top else "")


def test_eager_fp32_on_cuda_equals_the_cpu(checkpoint, images, eager) -> None:
    with Detector.load(checkpoint, device="cpu") as cpu:
        assert_same(eager, cpu(images), "CUDA eager fp32 vs CPU", box_tol=0.05, score_tol=1e-3)


def test_compiled_equals_eager(checkpoint, images, eager) -> None:
    # square images only: one input shape, one compilation (a second shape recompiles, ~30 s more)
    with Detector.load(checkpoint, device="cuda", compile=True) as detector:
        assert detector.info()["compile"]
        ours = detector(images[:CLEAR])
    assert_same(ours, eager[:CLEAR], "compile=True vs eager", box_tol=0.02, score_tol=1e-4)


def test_cuda_graphs_equal_eager_and_replay_for_two_shapes(checkpoint, images, eager) -> None:
    with Detector.load(checkpoint, device="cuda", cuda_graphs=True, warmup=False) as detector:
        first = detector(images)  # 128x128 (batch 4) and 128x256 (batch 2): two captures
        graphs = dict(detector.backend._graphs)
        assert len(graphs) == 2, f"expected one CUDA graph per input shape, got {list(graphs)}"
        again = detector(images)  # replays, no new capture
        assert {k: id(v[0]) for k, v in detector.backend._graphs.items()} == {
            k: id(v[0]) for k, v in graphs.items()
        }, "the second call should replay the captured graphs"
    assert_same(first, eager, "cuda_graphs=True (capture call) vs eager", box_tol=0.01, score_tol=1e-4)
    assert_same(again, eager, "cuda_graphs=True (replay) vs eager", box_tol=0.01, score_tol=1e-4)


def test_compiled_under_cuda_graphs_equals_eager(checkpoint, images, eager) -> None:
    with Detector.load(checkpoint, device="cuda", compile=True, cuda_graphs=True, warmup=False) as detector:
        ours = detector(images[:CLEAR])
    assert_same(ours, eager[:CLEAR], "compile + cuda_graphs vs eager", box_tol=0.02, score_tol=1e-4)
    with pytest.raises(ValueError, match="captures CUDA graphs itself"):
        Detector.load(
            checkpoint,
            device="cuda",
            compile=True,
            cuda_graphs=True,
            compile_options={"mode": "reduce-overhead"},
        )


def test_channels_last_equals_eager(checkpoint, images, eager) -> None:
    with Detector.load(checkpoint, device="cuda", channels_last=True) as detector:
        assert_same(detector(images), eager, "channels_last vs eager", box_tol=0.02, score_tol=1e-4)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_reduced_precision_is_close_to_fp32(checkpoint, images, eager, precision, cuda_graphs) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bfloat16")
    with Detector.load(checkpoint, device="cuda", precision=precision, cuda_graphs=cuda_graphs) as detector:
        results = detector(images)
    for index, (ours, reference) in enumerate(zip(results, eager)):
        label = f"{precision}{' + cuda_graphs' if cuda_graphs else ''}, image {index}"
        assert np.isfinite(ours.boxes).all() and np.isfinite(ours.scores).all(), f"{label}: not finite"
        if index >= CLEAR:  # two squares: their top scores may tie, only finiteness is checked
            continue
        assert len(ours) > 0, f"{label}: no detections (fp32: {_listing(reference)})"
        assert ours.class_ids[0] == reference.class_ids[0], (
            f"{label}: top-1 class {ours.class_ids[0]} vs fp32 {reference.class_ids[0]}\n"
            f"  {precision}: {_listing(ours)}\n  fp32: {_listing(reference)}"
        )
        iou = _iou(ours.boxes[0], reference.boxes[0])
        assert iou > 0.9, (
            f"{label}: top-1 box IoU {iou:.3f} with fp32 ({_listing(ours)} vs {_listing(reference)})"
        )
        moved = abs(float(ours.scores[0] - reference.scores[0]))
        assert moved < 0.05, f"{label}: top-1 score {ours.scores[0]:.4f} vs fp32 {reference.scores[0]:.4f}"


AOTI_CHILD = """
import pickle, sys, torch
from msad_deploy.export.aoti import AotiExportOptions, export_aoti
from msad_deploy.runtime import Detector
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
checkpoint, package, io = sys.argv[1:4]
with open(io, "rb") as f:
    images = pickle.load(f)
metadata = export_aoti(checkpoint, package, AotiExportOptions(device="cuda", dynamic=True))
with Detector.load(package) as detector:  # device "auto": the package's own, CUDA
    found = (detector.backend_name, str(detector.device), detector(images))
    try:
        Detector.load(package, device="cpu")
        refused = ""
    except ValueError as error:
        refused = str(error)
with open(io, "wb") as f:
    pickle.dump((metadata, found, refused), f)
"""


def test_aotinductor_cuda_package_equals_eager(checkpoint, images, eager, tmp_path) -> None:
    """Export + load + run in a child process: a crash inside torch's AOTInductor loader (seen as a
    segfault in ``aoti_load_package`` with torch 2.11.0+cu130, even for a one-op CPU package) is then a
    failure that says so, not the end of the test session."""
    if importlib.util.find_spec("msad_deploy.export") is None:
        pytest.skip("msad_deploy.export is not importable: install the project (pip install --no-deps -e .)")
    io = tmp_path / "io.pkl"
    io.write_bytes(pickle.dumps(images))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    command = [sys.executable, "-c", AOTI_CHILD, str(checkpoint), str(tmp_path / "student_cuda.pt2"), str(io)]
    child = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if child.returncode != 0:
        how = f"died of signal {-child.returncode}" if child.returncode < 0 else f"exited {child.returncode}"
        crashed = " (a crash inside torch/AOTInductor, not a Python error)" if child.returncode < 0 else ""
        pytest.fail(
            f"AOTInductor CUDA export + Detector.load {how}{crashed}; torch {torch.__version__}.\n"
            f"stderr (last 3000 characters):\n{child.stderr[-3000:]}",
            pytrace=False,
        )
    metadata, (backend, device, results), refused = pickle.loads(io.read_bytes())
    assert metadata["device"] == "cuda" and metadata["verify"]["passed"], metadata["verify"]
    assert backend == "aoti" and device.startswith("cuda"), (backend, device)
    assert_same(results, eager, "AOTInductor CUDA package vs eager", box_tol=0.02, score_tol=1e-4)
    assert "was compiled for cuda" in refused, f"loading the CUDA package on the CPU: {refused or 'no error'}"


@pytest.mark.parametrize("options", [{}, {"cuda_graphs": True}], ids=["eager", "cuda_graphs"])
def test_eight_threads_on_one_cuda_detector_equal_serial(checkpoint, images, options) -> None:
    """Each thread sends its own images one by one (both shapes, so CUDA graphs are captured while
    other threads decode on the GPU); every result equals the serial one."""
    work = [[images[(t + i) % len(images)] for i in range(4)] for t in range(8)]
    with Detector.load(checkpoint, device="cuda", warmup=False, **options) as detector:
        found: dict[int, list[Result]] = {}

        def run(thread: int) -> None:
            found[thread] = [detector(image) for image in work[thread]]

        errors = run_in_threads(run, timeout=300)
        assert not errors, f"{len(errors)} thread(s) failed, first: {errors[0]!r}"
        serial = [detector(image) for image in images]
    for t in range(8):
        expected = [serial[(t + i) % len(images)] for i in range(4)]
        assert_same(
            found[t], expected, f"thread {t} ({options or 'eager'}) vs serial", box_tol=1e-3, score_tol=1e-5
        )
