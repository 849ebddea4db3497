"""The runtime Detector: the same detections from a checkpoint, its ONNX and its .pt2; batches,
threads, every input kind, every bad input and bad artifact; TensorRT gated on a GPU."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msad_deploy.data.transforms import pad_images
from msad_deploy.models import load_model
from msad_deploy.runtime import BackendUnavailableError, Detector, InvalidImageError, Result
from msad_deploy.runtime.artifacts import read_sidecar, sidecar_path, write_sidecar
from msad_deploy.runtime.backends.tensorrt import check_engine_compatibility
from msad_deploy.runtime.preprocess import inference_network, postprocess, preprocess
from tests.runtime_fixtures import (
    CATEGORY_IDS,
    assert_same_results,
    frame_images,
    run_in_threads,
    sample_images,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detectors(runtime_artifacts):
    opened = {
        "checkpoint": Detector.load(runtime_artifacts["checkpoint"], device="cpu"),
        "onnx": Detector.load(runtime_artifacts["onnx"], device="cpu"),
        "pt2": Detector.load(runtime_artifacts["pt2"], device="cpu"),
    }
    yield opened
    for detector in opened.values():
        detector.close()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return sample_images(6)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_checkpoint_onnx_and_pt2_give_the_same_detections(detectors, images) -> None:
    reference = detectors["checkpoint"](images)
    assert [d.backend_name for d in detectors.values()] == ["pytorch", "onnxruntime", "aoti"]
    assert sum(len(r) for r in reference) > 0
    for name in ("onnx", "pt2"):
        batched = detectors[name](images)
        singles = [detectors[name](image) for image in images]
        for ours, one, ref in zip(batched, singles, reference):
            assert_same_results(ours, ref)
            assert_same_results(one, ref)
    # The checkpoint path is the evaluator's: preprocess -> network -> postprocess, bit for bit.
    loaded = load_model(detectors["checkpoint"].path)
    tensors = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    with torch.no_grad():
        batch = preprocess(tensors, loaded.spec)
        expected = postprocess(inference_network(loaded.model, loaded.spec)(batch.inputs), batch, loaded.spec)
    for index, result in enumerate(reference):
        n = int(expected.num_detections[index])
        assert np.array_equal(result.boxes, expected.boxes[index, :n].numpy())
        assert np.array_equal(result.class_ids, expected.labels[index, :n].numpy())


def test_result_object(detectors, images) -> None:
    result = detectors["onnx"](images[0])
    assert isinstance(result, Result) and result.image_size == images[0].shape[:2]
    assert result.boxes.dtype == np.float32 and result.boxes.shape == (len(result), 4)
    assert np.all(np.diff(result.scores) <= 0), "sorted by score"
    height, width = result.image_size
    assert result.boxes[:, [0, 2]].max() <= width and result.boxes[:, [1, 3]].max() <= height
    assert result.boxes.min() >= 0
    assert list(result.class_names) == [f"c{CATEGORY_IDS[i]}" for i in result.class_ids]
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["image_size"] == {"height": height, "width": width}
    assert len(payload["detections"]) == len(result)
    first = payload["detections"][0]
    assert (
        first["category_id"] == CATEGORY_IDS[first["class_id"]] and first["box"] == result.boxes[0].tolist()
    )
    coco = result.to_coco(image_id=7)
    assert len(coco) == len(result) and {r["image_id"] for r in coco} == {7}
    x1, y1, x2, y2 = result.boxes[0].tolist()
    assert coco[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.006)
    assert coco[0]["category_id"] == CATEGORY_IDS[int(result.class_ids[0])]
    thresholded = detectors["onnx"](images[0], score_thresh=float(result.scores[2]))
    assert len(thresholded) >= 3 and thresholded.scores.min() >= result.scores[2]
    assert detectors["onnx"]([]) == []


def test_fixed_batch_artifacts_split_and_pad(detectors, images) -> None:
    # student.pt2 takes exactly 2 images, student.onnx exactly 1: 3 images are split and padded.
    assert detectors["pt2"].backend.batch == 2 and detectors["onnx"].backend.batch == 1
    three = images[:3]
    for name in ("pt2", "onnx"):
        together = detectors[name](three)
        for image, result in zip(three, together):
            assert_same_results(result, detectors[name](image), box_tol=1e-4, score_tol=1e-6)


def test_eight_threads_get_the_serial_results(detectors, images) -> None:
    work = [images[i % len(images)] for i in range(16)]
    for name, detector in detectors.items():
        serial = [detector(image) for image in work]
        outputs: list[Result | None] = [None] * len(work)

        def worker(thread: int, detector=detector, outputs=outputs) -> None:
            for index in range(thread, len(work), 8):
                outputs[index] = detector(work[index])

        errors = run_in_threads(worker)
        assert not errors, (name, errors)
        for got, expected in zip(outputs, serial):
            assert np.array_equal(got.boxes, expected.boxes), name
            assert np.array_equal(got.scores, expected.scores) and np.array_equal(
                got.class_ids, expected.class_ids
            )


def test_every_input_kind_gives_the_same_result(detectors, images, tmp_path: Path) -> None:
    detector = detectors["checkpoint"]
    rgb = images[1]
    expected = detector(rgb)
    path = tmp_path / "image.png"
    path.write_bytes(_png(rgb))
    bigger = np.zeros((rgb.shape[0] + 10, rgb.shape[1] * 2, 4), np.uint8)
    bigger[5 : 5 + rgb.shape[0], : rgb.shape[1] * 2 : 2, :3] = rgb
    view = bigger[5 : 5 + rgb.shape[0], ::2, :3]  # non-contiguous: strided rows and columns
    assert not view.flags["C_CONTIGUOUS"]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], axis=2)
    kinds = {
        "path": path,
        "str path": str(path),
        "bytes": _png(rgb),
        "bytearray": bytearray(_png(rgb)),
        "PIL": Image.fromarray(rgb),
        "PIL RGBA": Image.fromarray(rgba, "RGBA"),
        "numpy view": view,
        "numpy RGBA": rgba,
        "torch HWC": torch.from_numpy(rgb.copy()),
        "torch CHW": torch.from_numpy(rgb.copy()).permute(2, 0, 1),
    }
    for name, value in kinds.items():
        got = detector(value)
        assert np.array_equal(got.boxes, expected.boxes), name
    assert np.array_equal(detector(rgb[:, :, ::-1], bgr=True).boxes, expected.boxes)
    assert np.array_equal(detector(np.ascontiguousarray(rgb[:, :, ::-1]), bgr=True).boxes, expected.boxes)
    gray = rgb[:, :, 1]
    gray_expected = detector(np.repeat(gray[:, :, None], 3, axis=2))
    for value in (gray, gray[:, :, None], Image.fromarray(gray, "L"), torch.from_numpy(gray.copy())):
        assert np.array_equal(detector(value).boxes, gray_expected.boxes)
    for result in detector([path, rgb, torch.from_numpy(rgb.copy())]):  # one batch of 3
        assert_same_results(result, expected, box_tol=1e-3, score_tol=1e-5)


def test_bad_inputs_raise_clear_errors_and_the_detector_keeps_working(
    detectors, images, tmp_path: Path
) -> None:
    good = images[0]
    expected = {name: d(good) for name, d in detectors.items()}
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    Image.fromarray(images[2]).save(buffer, format="JPEG", quality=90)
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(bomb)
    cases = [
        (np.zeros((2, 64, 64, 3), np.uint8), "4 dimensions"),
        (np.zeros(64, np.uint8), "1 dimensions"),
        (np.zeros((64, 64, 3), np.float32), "dtype float32"),
        (np.zeros((64, 64, 3), np.uint16), "dtype uint16"),
        (np.zeros((64, 64, 5), np.uint8), "5 channels"),
        (np.zeros((64, 64, 2), np.uint8), "2 channels"),
        (np.zeros((0, 64, 3), np.uint8), "empty image"),
        (torch.zeros(64, 64, 3, dtype=torch.float32), "dtype torch.float32"),
        (np.zeros((1, 1, 3), np.uint8), "at least 8 pixels"),
        (np.zeros((8, 4000, 3), np.uint8), "aspect ratio is too extreme"),
        (b"", "empty (0 bytes)"),
        (_png(images[3])[:80], "(truncated or corrupt?)"),
        (b"hello world", "not an image format"),
        (empty, "is empty (0 bytes)"),
        (text, "not an image format"),
        (truncated, "truncated"),
        (bomb, "over the limit of 1,000,000 pixels"),
        ({"image": 1}, "cannot read an image from a dict"),
    ]
    for name, detector in detectors.items():
        detector.max_pixels = 1_000_000
        try:
            for value, message in cases:
                with pytest.raises(ValueError, match=re.escape(message)):
                    detector(value)
                with pytest.raises(ValueError, match=re.escape(message)):
                    detector([good, value])  # one bad image fails the call, naming it
                assert np.array_equal(detector(good).boxes, expected[name].boxes), (name, message)
            with pytest.raises(FileNotFoundError):
                detector(tmp_path / "missing.jpg")
            with pytest.raises(IsADirectoryError):
                detector(tmp_path)
        finally:
            detector.max_pixels = 89_478_485
        assert np.array_equal(detector(good).boxes, expected[name].boxes)


def test_fixed_size_artifact_pads_up_and_refuses_larger_images(runtime_artifacts) -> None:
    with (
        Detector.load(runtime_artifacts["wide_onnx"], device="cpu") as wide,
        Detector.load(runtime_artifacts["wide_checkpoint"], device="cpu") as eager,
    ):
        assert wide.backend.input_size == (128, 256)
        landscape = sample_images(1, seed=3)[0][:64]  # 64 x 96 -> resized 128 x 192 -> padded 128 x 256
        assert_same_results(wide(landscape), eager(landscape))
        portrait = np.ascontiguousarray(landscape.transpose(1, 0, 2))  # 96 x 64 -> needs 256 x 128
        with pytest.raises(InvalidImageError, match=r"exported for 128x256 inputs.*needs 256x128"):
            wide(portrait)
        assert len(eager(portrait)) > 0  # the checkpoint takes any size
        assert_same_results(wide(landscape), eager(landscape))


def test_in_graph_preprocessing_artifact_takes_frames(runtime_artifacts, detectors) -> None:
    with Detector.load(runtime_artifacts["frames_onnx"], device="cpu") as frames:
        assert frames.takes_frames and frames.backend.input_size == (200, 256) and frames.backend.batch == 2
        images = frame_images()  # three 200x256 frames: a batch of 2, then one padded to 2
        assert len(images) == 3
        for ours, reference in zip(frames(images), detectors["checkpoint"](images)):
            assert_same_results(ours, reference)  # the graph resizes, pads and normalises as Python does
        with pytest.raises(InvalidImageError, match="in-graph preprocessing for 256x200 frames"):
            frames(np.zeros((256, 200, 3), np.uint8))
        assert_same_results(frames(images[0]), detectors["checkpoint"](images[0]))
        # the evaluation path: unresized images collated into a padded batch, cropped back to frames
        tensors = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
        padded, sizes = pad_images(tensors, 128)
        found = frames.detect_padded(padded, sizes, sizes).per_image()
        for image, got in zip(images, found):
            expected = frames(image)
            assert torch.equal(got["labels"], torch.from_numpy(expected.class_ids))
            assert np.abs(got["boxes"].numpy() - expected.boxes).max() <= 1e-4


def _copy(path: Path, to: Path, sidecar_from: Path | None = None) -> Path:
    shutil.copy(path, to)
    source = sidecar_path(sidecar_from or path)
    if source.is_file():
        shutil.copy(source, sidecar_path(to))
    return to


def test_bad_artifacts_are_refused_at_load(runtime_artifacts, tmp_path: Path) -> None:
    art = runtime_artifacts
    # another export's sidecar beside an ONNX file / a .pt2 package
    swapped = _copy(art["onnx"], tmp_path / "swapped.onnx", sidecar_from=art["wide_onnx"])
    with pytest.raises(ValueError, match="does not describe"):
        Detector.load(swapped, device="cpu")
    metadata = read_sidecar(art["pt2"])
    metadata["spec"]["num_classes"] = 3
    metadata["spec"]["class_names"] = metadata["spec"]["class_names"][:3]
    metadata["spec"]["category_ids"] = metadata["spec"]["category_ids"][:3]
    edited = _copy(art["pt2"], tmp_path / "edited.pt2")
    write_sidecar(edited, metadata)
    with pytest.raises(ValueError, match="spec.*differ"):
        Detector.load(edited, device="cpu")
    # an edited ONNX sidecar: other classes, another precision
    for key, value, message in (("precision", "fp16", "differ"), ("input_size", [256, 256], "differ")):
        data = read_sidecar(art["onnx"])
        data[key] = value
        target = _copy(art["onnx"], tmp_path / f"edited_{key}.onnx")
        write_sidecar(target, data)
        with pytest.raises(ValueError, match=message):
            Detector.load(target, device="cpu")
    # corrupt files, each with a valid sidecar
    for suffix, source in ((".onnx", art["onnx"]), (".pt2", art["pt2"])):
        corrupt = tmp_path / f"corrupt{suffix}"
        corrupt.write_bytes(b"\x00garbage" * 100)
        shutil.copy(sidecar_path(source), sidecar_path(corrupt))
        with pytest.raises(ValueError, match="not a (readable|loadable)"):
            Detector.load(corrupt, device="cpu")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(art["onnx"].read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        Detector.load(truncated, device="cpu")
    bad_checkpoint = tmp_path / "bad.pt"
    bad_checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable msad-deploy checkpoint"):
        Detector.load(bad_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="cannot tell the artifact type"):
        Detector.load(tmp_path / "model.bin")
    with pytest.raises(FileNotFoundError):
        Detector.load(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="has no option compile; its options: providers"):
        Detector.load(art["onnx"], compile=True)
    with pytest.raises(ValueError, match="the onnxruntime backend cannot run it"):
        Detector.load(art["pt2"], backend="onnxruntime")
    # without a sidecar, the metadata embedded in the artifact is used
    alone = tmp_path / "alone"
    alone.mkdir()
    for key in ("onnx", "pt2"):
        copy = alone / art[key].name
        shutil.copy(art[key], copy)
        with Detector.load(copy, device="cpu") as detector:
            image = sample_images(1)[0]
            with Detector.load(art[key], device="cpu") as original:
                assert_same_results(detector(image), original(image), box_tol=0, score_tol=0)


def test_tensorrt_engines_gate_on_the_library_and_check_version_and_gpu(runtime_artifacts, tmp_path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    metadata = read_sidecar(runtime_artifacts["onnx"])
    metadata.update(
        kind="tensorrt", tensorrt={"version": "10.3.0", "gpu": {"name": "L4", "compute_capability": "8.9"}}
    )
    write_sidecar(engine, metadata)
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except (ImportError, OSError):
        has_trt = False
    if not has_trt:
        with pytest.raises(BackendUnavailableError, match=r"msad-deploy\[tensorrt\]"):
            Detector.load(engine)
    h100 = {"name": "H100", "compute_capability": "9.0"}
    l4 = {"name": "L4", "compute_capability": "8.9"}
    with pytest.raises(ValueError, match=r"built by TensorRT 10.3.0 but this is TensorRT 10.8.0"):
        check_engine_compatibility(metadata, engine, "10.8.0", l4)
    with pytest.raises(ValueError, match=r"built for L4 \(compute capability 8.9\); this is H100"):
        check_engine_compatibility(metadata, engine, "10.3.0", h100)
    check_engine_compatibility(metadata, engine, "10.3.0", l4)
    metadata["tensorrt"]["version_compatible"] = True
    check_engine_compatibility(metadata, engine, "10.8.0", l4)
    with pytest.raises(ValueError, match="another major version"):
        check_engine_compatibility(metadata, engine, "11.0.0", l4)


def test_backend_options(runtime_artifacts, detectors, images) -> None:
    image = images[2]
    reference = detectors["checkpoint"](image)
    with Detector.load(runtime_artifacts["checkpoint"], device="cpu", channels_last=True) as detector:
        assert_same_results(detector(image), reference, box_tol=1e-3)
    with Detector.load(
        runtime_artifacts["checkpoint"], device="cpu", compile=True, compile_options={"backend": "eager"}
    ) as detector:
        assert detector.backend.compiled
        assert_same_results(detector(image), reference, box_tol=1e-3)
    with Detector.load(runtime_artifacts["checkpoint"], device="cpu", precision="bf16") as detector:
        result = detector(image)  # bf16 network: a different answer, the same output form
        assert len(result) > 0 and result.boxes.dtype == np.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        Detector.load(runtime_artifacts["checkpoint"], precision="int4")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        Detector.load(runtime_artifacts["checkpoint"], device="cpu", cuda_graphs=True)
    with Detector.load(
        runtime_artifacts["onnx"], device="cpu", intra_op_threads=1, graph_optimization_level="basic"
    ) as detector:
        assert_same_results(detector(image), detectors["onnx"](image), box_tol=1e-3)
        assert detector.info()["providers"] == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="graph_optimization_level must be one of"):
        Detector.load(runtime_artifacts["onnx"], graph_optimization_level="max")
    with pytest.raises(ValueError, match="are not available here"):
        Detector.load(runtime_artifacts["onnx"], providers=["NoSuchExecutionProvider"])
    # a CPU package asked to run on a GPU (or, here, asking for a GPU that is not there)
    with pytest.raises(ValueError, match="compiled for cpu; it cannot run on cuda|sees no CUDA device"):
        Detector.load(runtime_artifacts["pt2"], device="cuda")


def test_close_and_context_manager(runtime_artifacts, images) -> None:
    with Detector.load(runtime_artifacts["onnx"], device="cpu", warmup=False) as detector:
        assert len(detector(images[0])) > 0
    with pytest.raises(ValueError, match="is closed"):
        detector(images[0])
    detector.close()  # twice is fine


def _cuda_reason() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA device"


@pytest.mark.gpu
def test_cuda_backends_match_the_cpu(runtime_artifacts, images) -> None:
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    with Detector.load(runtime_artifacts["checkpoint"], device="cpu") as cpu:
        reference = cpu(images)
    for options in ({}, {"cuda_graphs": True}, {"channels_last": True}):
        with Detector.load(runtime_artifacts["checkpoint"], device="cuda", **options) as gpu:
            for ours, ref in zip(gpu(images), reference):
                assert_same_results(ours, ref, box_tol=0.05, score_tol=1e-3)


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnx(runtime_artifacts, images, tmp_path) -> None:
    from msad_deploy.export.tensorrt import EngineOptions, build_engine, tensorrt_version

    if tensorrt_version() is None or torch.cuda.is_available() is False:
        pytest.skip("needs TensorRT (`pip install msad-deploy[tensorrt]`) and a CUDA device")
    engine = tmp_path / "student.engine"
    build_engine(runtime_artifacts["onnx"], engine, EngineOptions(workspace_gib=1))
    with (
        Detector.load(engine, contexts=2) as trt_detector,
        Detector.load(runtime_artifacts["onnx"], device="cpu") as onnx_detector,
    ):
        assert trt_detector.backend_name == "tensorrt"
        for ours, ref in zip(trt_detector(images), onnx_detector(images)):
            assert_same_results(ours, ref, box_tol=0.05, score_tol=1e-3)


def test_host_threads_leave_the_cores_to_onnx_runtime_on_the_cpu() -> None:
    from msad_deploy.runtime.backends import host_threads

    assert host_threads("onnxruntime", "cpu") == 1
    assert host_threads("onnxruntime", "cuda:0") is None  # the GPU runs the network
    for backend in ("pytorch", "aoti", "tensorrt"):
        assert host_threads(backend, "cpu") is None


def test_onnxruntime_spinning_is_what_the_session_was_built_with(runtime_artifacts) -> None:
    onnx = runtime_artifacts["onnx"]
    with Detector.load(onnx, "cpu", allow_spinning=False, warmup=False) as off:
        assert off.info()["allow_spinning"] is False
    with Detector.load(onnx, "cpu", warmup=False) as default:  # ORT's own default: spinning on
        assert default.info()["allow_spinning"] is True
    with pytest.raises(ValueError, match="allow_spinning must be true or false"):
        Detector.load(onnx, "cpu", allow_spinning="no", warmup=False)
