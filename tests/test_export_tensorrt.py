"""msad export tensorrt: build plans for TensorRT 10 and 11 (no TensorRT needed), errors, sidecar, CLI.

The real build runs only where ``tensorrt`` imports and a CUDA device is visible (marker gpu).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from msad_deploy.export.tensorrt import (
    EngineOptions,
    GraphFacts,
    TensorRTUnavailableError,
    engine_metadata,
    inspect_onnx,
    plan_build,
    require_tensorrt,
    tensorrt_version,
)

from msad_deploy.cli import main
from msad_deploy.runtime.artifacts import read_sidecar, sha256_file, tensor_info, write_sidecar
from tests.artifact_fixtures import conv_onnx, frame_inputs, image_inputs, make_sidecar

pytest.importorskip("onnx")

FP32 = GraphFacts()
FP16 = GraphFacts(has_fp16=True)
QDQ = GraphFacts(has_qdq=True)
NMS_PLUGIN = GraphFacts(has_efficient_nms=True)


@pytest.fixture
def dynamic() -> dict:
    return make_sidecar(image_inputs())


@pytest.fixture
def no_tensorrt(monkeypatch) -> None:
    """Make `import tensorrt` (and tensorrt_lean) fail even where they are installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


# --- profiles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("major", [10, 11])
def test_default_profiles_follow_the_spec(dynamic, major) -> None:
    plan = plan_build(dynamic, EngineOptions(), major, FP32)
    # step 128 / 2**1 = 64; opt = padded test size 256x512 / 2; max = padded 448 -> 512, square, / 2.
    assert plan.profiles["images"] == {
        "min": [1, 3, 64, 64],
        "opt": [8, 3, 128, 256],
        "max": [8, 3, 256, 256],
    }
    assert plan.profiles["image_sizes"] == {"min": [1, 2], "opt": [8, 2], "max": [8, 2]}
    assert plan.needs_profile and plan.precision == "fp32" and plan.builder_flags == []
    assert plan.strongly_typed is (major == 11)


def test_given_profile_sizes_are_used_exactly(dynamic) -> None:
    options = EngineOptions(
        min_batch=1, opt_batch=2, max_batch=4, min_size=(64, 64), opt_size=(128, 192), max_size=(320, 320)
    )
    plan = plan_build(dynamic, options, 10, FP32)
    assert plan.profiles["images"] == {
        "min": [1, 3, 64, 64],
        "opt": [2, 3, 128, 192],
        "max": [4, 3, 320, 320],
    }
    assert plan.profiles["image_sizes"]["max"] == [4, 2]


def test_defaults_fit_inside_a_given_max(dynamic) -> None:
    plan = plan_build(dynamic, EngineOptions(max_batch=2, max_size=(128, 128)), 10, FP32)
    assert plan.profiles["images"] == {
        "min": [1, 3, 64, 64],
        "opt": [2, 3, 128, 128],
        "max": [2, 3, 128, 128],
    }


def test_fixed_sidecar_gives_fixed_profile_and_refuses_dynamic_options() -> None:
    fixed = make_sidecar(image_inputs(batch=1, size=(128, 192)))
    plan = plan_build(fixed, EngineOptions(), 10, FP32)
    assert not plan.needs_profile
    assert plan.profiles["images"] == {k: [1, 3, 128, 192] for k in ("min", "opt", "max")}
    with pytest.raises(ValueError, match=r"--max-batch 4: the ONNX model has a fixed batch of 1"):
        plan_build(fixed, EngineOptions(max_batch=4), 10, FP32)
    with pytest.raises(ValueError, match=r"--max-size: the ONNX model has fixed spatial input sizes"):
        plan_build(fixed, EngineOptions(max_size=(256, 256)), 10, FP32)


def test_dynamic_batch_fixed_size() -> None:
    metadata = make_sidecar(image_inputs(size=(128, 192)))
    plan = plan_build(metadata, EngineOptions(max_batch=4), 11, FP32)
    assert plan.profiles["images"] == {
        "min": [1, 3, 128, 192],
        "opt": [4, 3, 128, 192],
        "max": [4, 3, 128, 192],
    }


def test_frames_take_any_size() -> None:
    metadata = make_sidecar(frame_inputs(), preprocess=True)
    plan = plan_build(metadata, EngineOptions(), 10, FP32)
    assert plan.profiles["frames"] == {
        "min": [1, 32, 32, 3],
        "opt": [8, 256, 448, 3],
        "max": [8, 4096, 4096, 3],
    }
    odd = plan_build(
        metadata, EngineOptions(min_size=(1, 1), opt_size=(481, 641), max_size=(1080, 1920)), 10, FP32
    )
    assert odd.profiles["frames"]["opt"] == [8, 481, 641, 3]


@pytest.mark.parametrize(
    "options,match",
    [
        (
            EngineOptions(opt_size=(100, 128)),
            r"--opt-size 100x128: the network input must be a multiple of 64",
        ),
        (
            EngineOptions(max_size=(256, 300)),
            r"--max-size 256x300: .*multiple of 64.*use e\.g\. --max-size 256x320",
        ),
        (EngineOptions(min_batch=4, opt_batch=2), r"--min-batch <= --opt-batch <= --max-batch"),
        (EngineOptions(max_batch=0), r"--max-batch must be at least 1"),
        (EngineOptions(min_size=(256, 256), max_size=(128, 128)), r"--min-size <= --opt-size <= --max-size"),
        (EngineOptions(workspace_gib=0), r"--workspace-gib must be positive"),
        (EngineOptions(builder_optimization_level=7), r"--opt-level must be 0\.\.5"),
    ],
)
def test_bad_options_name_the_option(dynamic, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        plan_build(dynamic, options, 10, FP32)


def test_unknown_symbolic_dim_and_unsupported_versions(dynamic) -> None:
    odd = make_sidecar([tensor_info("images", "float32", ["batch", 3, "h_pad", "width"])])
    with pytest.raises(ValueError, match=r"symbolic dimension 'h_pad'"):
        plan_build(odd, EngineOptions(), 10, FP32)
    unknown = make_sidecar([tensor_info("images", "float32", ["batch", 3, 0, "width"])])
    with pytest.raises(ValueError, match=r"unknown dimension \(0\)"):
        plan_build(unknown, EngineOptions(), 10, FP32)
    with pytest.raises(ValueError, match=r"TensorRT 9 is not supported"):
        plan_build(dynamic, EngineOptions(), 9, FP32)
    with pytest.raises(ValueError, match=r"builds from an ONNX artifact"):
        plan_build({**dynamic, "kind": "tensorrt"}, EngineOptions(), 10, FP32)


# --- precision ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,graph,flags,strongly_typed,precision",
    [
        (EngineOptions(fp16=True), FP32, ["FP16"], False, "fp16"),
        (EngineOptions(), FP16, [], True, "fp16"),
        (EngineOptions(fp16=True), FP16, [], True, "fp16"),
        (EngineOptions(int8=True), QDQ, ["INT8"], False, "int8"),
        (EngineOptions(int8=True, fp16=True), QDQ, ["FP16", "INT8"], False, "int8"),
        (EngineOptions(), QDQ, ["INT8"], False, "int8"),
        (EngineOptions(int8=True), GraphFacts(has_qdq=True, has_fp16=True), [], True, "int8"),
        (EngineOptions(version_compatible=True), FP32, ["VERSION_COMPATIBLE"], False, "fp32"),
    ],
)
def test_tensorrt10_precision(dynamic, options, graph, flags, strongly_typed, precision) -> None:
    plan = plan_build(dynamic, options, 10, graph)
    assert plan.builder_flags == flags
    assert plan.strongly_typed is strongly_typed
    assert plan.precision == precision


@pytest.mark.parametrize(
    "options,graph,precision",
    [
        (EngineOptions(), FP32, "fp32"),
        (EngineOptions(fp16=True), FP16, "fp16"),
        (EngineOptions(), FP16, "fp16"),
        (EngineOptions(int8=True), QDQ, "int8"),
    ],
)
def test_tensorrt11_takes_precision_from_the_graph(dynamic, options, graph, precision) -> None:
    plan = plan_build(dynamic, options, 11, graph)
    assert plan.strongly_typed and plan.precision == precision
    assert plan.builder_flags == []  # TensorRT 11 has no FP16/INT8 flags


def test_tensorrt10_entropy_calibration_replays_a_cache(dynamic, tmp_path: Path) -> None:
    cache = tmp_path / "calib.cache"
    cache.write_bytes(b"TRT-1000-EntropyCalibration2\n")
    plan = plan_build(
        dynamic, EngineOptions(int8=True, int8_calibration="entropy", calibration_cache=cache), 10, FP32
    )
    assert plan.builder_flags == ["INT8"] and plan.int8_calibration == "entropy"
    assert plan.calibration_cache == str(cache) and plan.precision == "int8"


@pytest.mark.parametrize(
    "major,options,graph,error,match",
    [
        (11, EngineOptions(fp16=True), FP32, ValueError, r"TensorRT 11 .*export with --precision fp16"),
        (11, EngineOptions(int8=True), FP32, ValueError, r"TensorRT 11 .*export with --precision int8"),
        (11, EngineOptions(int8=True, int8_calibration="entropy", calibration_cache=Path("c")), FP32,
         ValueError, r"removed in TensorRT 11"),
        (10, EngineOptions(int8=True), FP32, ValueError, r"export with --precision int8.*--calib-cache"),
        (10, EngineOptions(int8=True, int8_calibration="entropy"), FP32, ValueError, r"needs --calib-cache PATH"),
        (10, EngineOptions(int8=True, int8_calibration="entropy", calibration_cache=Path("/nonexistent/c")), FP32,
         FileNotFoundError, r"--calib-cache /nonexistent/c does not exist"),
        (10, EngineOptions(int8_calibration="entropy", calibration_cache=Path("c")), FP32, ValueError, r"needs --int8"),
        (10, EngineOptions(int8=True, int8_calibration="entropy", calibration_cache=Path("c")), QDQ,
         ValueError, r"already has Q/DQ nodes"),
        (11, EngineOptions(), NMS_PLUGIN, ValueError, r"EfficientNMS_TRT plugin.*export with --nms ort"),
        (10, EngineOptions(version_compatible=True), NMS_PLUGIN, ValueError, r"--version-compatible with the EfficientNMS"),
    ],
)  # fmt: skip
def test_impossible_combinations_are_refused(dynamic, major, options, graph, error, match) -> None:
    with pytest.raises(error, match=match):
        plan_build(dynamic, options, major, graph)


def test_efficient_nms_plugin_on_tensorrt10_loads_plugins(dynamic) -> None:
    assert plan_build(dynamic, EngineOptions(), 10, NMS_PLUGIN).plugins
    assert not plan_build(dynamic, EngineOptions(), 10, FP32).plugins


def test_sidecar_stands_in_for_the_graph(dynamic) -> None:
    with pytest.raises(ValueError, match=r"--nms ort"):
        plan_build({**dynamic, "nms": "trt", "trt_version": 10}, EngineOptions(), 11)
    # nms "trt" exported for TensorRT 11 is ONNX NonMaxSuppression: no plugin.
    assert not plan_build({**dynamic, "nms": "trt", "trt_version": 11}, EngineOptions(), 11).plugins
    assert plan_build({**dynamic, "precision": "fp16"}, EngineOptions(fp16=True), 11).precision == "fp16"


# --- the ONNX graph ----------------------------------------------------------------------------------


def test_inspect_onnx_finds_qdq_fp16_and_the_nms_plugin(tmp_path: Path, dynamic) -> None:
    assert inspect_onnx(conv_onnx(tmp_path / "fp32.onnx", dynamic)) == FP32
    assert inspect_onnx(conv_onnx(tmp_path / "fp16.onnx", dynamic, fp16=True)) == FP16
    assert inspect_onnx(conv_onnx(tmp_path / "q.onnx", dynamic, qdq=True)) == QDQ
    assert inspect_onnx(conv_onnx(tmp_path / "nms.onnx", dynamic, efficient_nms=True)) == NMS_PLUGIN
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0a\xff not protobuf")
    with pytest.raises(ValueError, match=r"junk.onnx is not a readable ONNX file"):
        inspect_onnx(junk)


# --- sidecar -----------------------------------------------------------------------------------------


def test_engine_sidecar_copies_the_onnx_sidecar_and_records_the_build(tmp_path: Path, dynamic) -> None:
    dynamic = {**dynamic, "kind": "onnx", "artifact": "model.onnx"}  # as msad export onnx writes it
    onnx_path = conv_onnx(tmp_path / "model.onnx", dynamic)
    plan = plan_build(dynamic, EngineOptions(fp16=True, max_batch=4), 10, FP32)
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    metadata = engine_metadata(
        dynamic,
        plan,
        tensorrt_version="10.13.0.35",
        gpu=gpu,
        source_onnx=onnx_path.name,
        source_onnx_sha256=sha256_file(onnx_path),
        artifact="model.engine",
    )
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    write_sidecar(engine, metadata)
    back = read_sidecar(engine)
    assert back["kind"] == "tensorrt" and back["precision"] == "fp16"
    assert back["tensorrt"]["version"] == "10.13.0.35" and back["tensorrt"]["gpu"] == gpu
    assert back["tensorrt"]["builder_flags"] == ["FP16"]
    assert back["versions"]["tensorrt"] == "10.13.0.35" and back["versions"]["msad_deploy"] == "0.1.0"
    assert back["profiles"]["images"]["max"] == [4, 3, 256, 256]
    assert back["source_onnx"] == "model.onnx" and back["source_onnx_sha256"] == sha256_file(onnx_path)
    for key in ("spec", "inputs", "outputs", "nms", "preprocess", "source_checkpoint", "source_sha256"):
        assert back[key] == dynamic[key]
    assert back["artifact"] == "model.engine"
    assert dynamic["kind"] == "onnx" and dynamic["artifact"] == "model.onnx"  # the ONNX sidecar is untouched


# --- TensorRT missing --------------------------------------------------------------------------------


def test_require_tensorrt_says_how_to_install(no_tensorrt) -> None:
    assert tensorrt_version() is None
    with pytest.raises(TensorRTUnavailableError, match=r"pip install msad-deploy\[tensorrt\]") as info:
        require_tensorrt()
    assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)


def test_cli_without_tensorrt_exits_2_with_one_line(no_tensorrt, tmp_path: Path, dynamic, capsys) -> None:
    onnx_path = conv_onnx(tmp_path / "model.onnx", dynamic)
    engine = tmp_path / "model.engine"
    assert main(["export", "tensorrt", str(onnx_path), "--out", str(engine)]) == 2
    err = _stderr_line(capsys)
    assert "msad export: error:" in err and "`tensorrt` package" in err and "pip install" in err
    assert not engine.exists() and not (tmp_path / "model.engine.json").exists()


def test_cli_missing_onnx_or_sidecar(no_tensorrt, tmp_path: Path, dynamic, capsys) -> None:
    assert main(["export", "tensorrt", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "e")]) == 2
    assert "nope.onnx does not exist" in _stderr_line(capsys)
    onnx_path = conv_onnx(tmp_path / "model.onnx", dynamic)
    (tmp_path / "model.onnx.json").unlink()
    assert main(["export", "tensorrt", str(onnx_path), "--out", str(tmp_path / "e")]) == 2
    assert "no metadata sidecar" in _stderr_line(capsys)


def test_cli_dry_run_prints_the_plan_without_tensorrt(no_tensorrt, tmp_path: Path, dynamic, capsys) -> None:
    onnx_path = conv_onnx(tmp_path / "model.onnx", dynamic, fp16=True)
    args = ["export", "tensorrt", str(onnx_path), "--out", str(tmp_path / "m.engine"), "--dry-run"]
    assert main(args + ["--trt-major", "11", "--fp16", "--max-batch", "2", "--opt-size", "128x192"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["trt_major"] == 11 and plan["precision"] == "fp16" and plan["strongly_typed"]
    assert plan["profiles"]["images"]["opt"] == [2, 3, 128, 192]
    assert not (tmp_path / "m.engine").exists()


def test_cli_plan_errors_are_one_line(no_tensorrt, tmp_path: Path, dynamic, capsys) -> None:
    onnx_path = conv_onnx(tmp_path / "model.onnx", dynamic)
    args = ["export", "tensorrt", str(onnx_path), "--out", str(tmp_path / "m.engine"), "--dry-run"]
    assert main(args + ["--trt-major", "11", "--fp16"]) == 2
    assert "export with --precision fp16" in _stderr_line(capsys)
    assert main(args + ["--trt-major", "10", "--opt-size", "100x100"]) == 2
    assert "--opt-size 100x100" in _stderr_line(capsys)


def test_cli_rejects_malformed_sizes(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "tensorrt", "m.onnx", "--out", "m.engine", "--max-size", "640"])
    assert info.value.code == 2
    assert "expected HxW" in capsys.readouterr().err


def test_every_option_has_help() -> None:
    import argparse

    from msad_deploy.export.tensorrt import register_tensorrt

    sub = argparse.ArgumentParser().add_subparsers()
    register_tensorrt(sub)
    parser = sub.choices["tensorrt"]
    for action in parser._actions:
        assert action.help, action.dest


# --- a real engine -----------------------------------------------------------------------------------


def _gpu_ready() -> str | None:
    if tensorrt_version() is None:
        return "needs the TensorRT builder (`pip install msad-deploy[tensorrt]`)"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return None


@pytest.mark.gpu
def test_real_engine_builds_loads_and_matches_onnxruntime(tmp_path: Path, dynamic) -> None:
    reason = _gpu_ready()
    if reason:
        pytest.skip(reason)
    import numpy as np
    import onnxruntime as ort
    import tensorrt as trt
    import torch
    from msad_deploy.export.tensorrt import build_engine

    onnx_path = conv_onnx(tmp_path / "model.onnx", dynamic)
    engine_path = tmp_path / "model.engine"
    cache = tmp_path / "timing.cache"
    options = EngineOptions(max_batch=2, max_size=(128, 192), timing_cache=cache, workspace_gib=1)
    metadata = build_engine(onnx_path, engine_path, options)
    assert cache.is_file() and cache.stat().st_size > 0
    assert read_sidecar(engine_path) == metadata
    assert metadata["kind"] == "tensorrt" and metadata["profiles"]["images"]["max"] == [2, 3, 128, 192]

    # A plain serialized engine: TensorRT's runtime deserializes the file as is.
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    assert engine is not None
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert {"images", "image_sizes", "boxes"} <= names

    images = np.random.default_rng(0).standard_normal((2, 3, 64, 128)).astype(np.float32)
    sizes = np.array([[128, 256], [100, 200]], np.float32)
    expected = ort.InferenceSession(str(onnx_path)).run(["boxes"], {"images": images, "image_sizes": sizes})[
        0
    ]
    context = engine.create_execution_context()
    inputs = {"images": torch.from_numpy(images).cuda(), "image_sizes": torch.from_numpy(sizes).cuda()}
    for name, tensor in inputs.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    out = torch.empty(tuple(context.get_tensor_shape("boxes")), dtype=torch.float32, device="cuda")
    context.set_tensor_address("boxes", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-3, atol=1e-3)


def test_an_int8_onnx_quantised_for_onnxruntime_is_refused(dynamic) -> None:
    """uint8 activations (the ONNX Runtime form of `msad export onnx --precision int8`) never reach
    TensorRT's builder, which takes symmetric int8 Q/DQ only; the message names the export to use."""
    ort_int8 = {**dynamic, "precision": "int8", "calibration": {"activations": "uint8"}}
    with pytest.raises(ValueError, match=r"ONNX Runtime \(asymmetric uint8.*--nms trt --precision int8"):
        plan_build(ort_int8, EngineOptions(int8=True), 10, QDQ)
    trt_int8 = {**dynamic, "precision": "int8", "calibration": {"activations": "int8"}}
    assert plan_build(trt_int8, EngineOptions(int8=True), 10, QDQ).precision == "int8"
