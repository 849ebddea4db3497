"""msad export triton: model repositories for ONNX files and engines, configs parsed with Triton's schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from msad_deploy.export.triton import (
    TritonOptions,
    _to_text,
    model_config,
    model_config_schema,
    render_config,
    write_repository,
)

from msad_deploy.cli import main
from msad_deploy.runtime.artifacts import read_sidecar, tensor_info, write_sidecar
from tests.artifact_fixtures import (
    SPEC,
    conv_onnx,
    detection_outputs,
    frame_inputs,
    image_inputs,
    make_sidecar,
)

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def schema():
    module = model_config_schema()
    if module is None:
        pytest.skip("tritonclient is not installed (pip install msad-deploy[triton])")
    return module


def parse(schema, path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), schema.ModelConfig())


def dims(entry) -> list[int]:
    return list(entry.dims)


def _stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def fake_engine(path: Path, *, min_batch=1, max_batch=4, version_compatible=False) -> Path:
    """Engine bytes are opaque to the repository writer: a byte string plus an engine sidecar."""
    path.write_bytes(b"\x00fake serialized TensorRT engine\x01" * 8)
    metadata = make_sidecar(image_inputs(), nms="ort", precision="fp16")
    profile = {
        "images": {
            "min": [min_batch, 3, 64, 64],
            "opt": [max_batch, 3, 128, 256],
            "max": [max_batch, 3, 256, 256],
        },
        "image_sizes": {"min": [min_batch, 2], "opt": [max_batch, 2], "max": [max_batch, 2]},
    }
    metadata.update(
        kind="tensorrt",
        profiles=profile,
        tensorrt={
            "version": "10.13.0.35",
            "gpu": {"name": "NVIDIA L4"},
            "version_compatible": version_compatible,
        },
        source_onnx="model.onnx",
        source_onnx_sha256="1" * 64,
    )
    write_sidecar(path, metadata)
    return path


def test_fixed_batch_onnx(schema, tmp_path: Path) -> None:
    metadata = make_sidecar(image_inputs(batch=1, size=(128, 192)))
    onnx_path = conv_onnx(tmp_path / "student.onnx", metadata)
    result = write_repository(onnx_path, tmp_path / "repo", TritonOptions(max_batch=1))
    model_dir = tmp_path / "repo" / "student"
    assert result.model_file == model_dir / "1" / "model.onnx"
    assert result.model_file.read_bytes() == onnx_path.read_bytes()
    assert read_sidecar(result.model_file) == metadata  # our runtime can load the copy too
    config = parse(schema, model_dir / "config.pbtxt")
    assert config.name == "student" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    inputs = {i.name: i for i in config.input}
    assert dims(inputs["images"]) == [1, 3, 128, 192] and inputs["images"].data_type == schema.TYPE_FP32
    assert dims(inputs["image_sizes"]) == [1, 2]
    outputs = {o.name: o for o in config.output}
    assert dims(outputs["boxes"]) == [1, 100, 4] and dims(outputs["num_detections"]) == [1]
    assert (
        outputs["labels"].data_type == schema.TYPE_INT64 and outputs["labels"].label_filename == "labels.txt"
    )
    assert not outputs["num_detections"].HasField("reshape")
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, schema.ModelInstanceGroup.KIND_GPU)]
    assert (model_dir / "labels.txt").read_text().split() == SPEC.class_names


def test_fixed_batch_refuses_a_larger_max_batch(tmp_path: Path) -> None:
    onnx_path = conv_onnx(tmp_path / "m.onnx", make_sidecar(image_inputs(batch=1, size=(128, 192))))
    with pytest.raises(ValueError, match=r"--max-batch 4: .* fixed batch of 1"):
        write_repository(onnx_path, tmp_path / "repo", TritonOptions(max_batch=4))
    with pytest.raises(ValueError, match=r"--preferred-batch: .* fixed batch"):
        write_repository(onnx_path, tmp_path / "repo", TritonOptions(preferred_batch=[2]))
    assert not (tmp_path / "repo" / "m" / "1").exists()


def test_dynamic_batch_onnx(schema, tmp_path: Path) -> None:
    onnx_path = conv_onnx(tmp_path / "model.onnx", make_sidecar(image_inputs()))
    options = TritonOptions(
        name="msad", version=3, preferred_batch=[8, 4], max_queue_delay_us=250, instances=2
    )
    result = write_repository(onnx_path, tmp_path / "repo", options)
    assert result.version_dir == tmp_path / "repo" / "msad" / "3"
    config = parse(schema, result.config_path)
    assert config.max_batch_size == 8
    inputs = {i.name: i for i in config.input}
    assert dims(inputs["images"]) == [3, -1, -1] and dims(inputs["image_sizes"]) == [2]
    outputs = {o.name: o for o in config.output}
    assert dims(outputs["boxes"]) == [100, 4] and dims(outputs["scores"]) == [100]
    # A [B] output: dims [1] and an empty reshape, as Triton requires for batch-only tensors.
    assert dims(outputs["num_detections"]) == [1]
    assert (
        outputs["num_detections"].HasField("reshape") and list(outputs["num_detections"].reshape.shape) == []
    )
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.instance_group[0].count == 2


def test_uint8_frames_on_cpu(schema, tmp_path: Path) -> None:
    onnx_path = conv_onnx(tmp_path / "pre.onnx", make_sidecar(frame_inputs(), preprocess=True))
    result = write_repository(onnx_path, tmp_path / "repo", TritonOptions(kind="cpu", max_batch=16))
    config = parse(schema, result.config_path)
    (frames,) = config.input
    assert frames.name == "frames" and frames.data_type == schema.TYPE_UINT8 and dims(frames) == [-1, -1, 3]
    assert config.max_batch_size == 16
    assert config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_CPU
    assert "--gpus" not in result.docker_command


def test_raw_outputs_have_symbolic_dims(schema, tmp_path: Path) -> None:
    raw = [
        tensor_info("boxes", "float32", ["batch", 0, 4]),  # 0: a dim the ONNX graph leaves unknown
        tensor_info("scores", "float32", ["batch", "locations", SPEC.num_classes]),
    ]
    metadata = make_sidecar(
        [tensor_info("images", "float32", ["batch", 3, "height", "width"])], raw, nms="none"
    )
    onnx_path = conv_onnx(tmp_path / "raw.onnx", metadata)
    config = parse(schema, write_repository(onnx_path, tmp_path / "repo").config_path)
    outputs = {o.name: o for o in config.output}
    assert dims(outputs["boxes"]) == [-1, 4] and dims(outputs["scores"]) == [-1, 3]
    assert not any(o.label_filename for o in config.output)


def test_engine_becomes_a_tensorrt_plan(schema, tmp_path: Path) -> None:
    engine = fake_engine(tmp_path / "student.engine", max_batch=4)
    result = write_repository(engine, tmp_path / "repo")
    assert result.model_file == tmp_path / "repo" / "student" / "1" / "model.plan"
    assert result.model_file.read_bytes() == engine.read_bytes()  # the plan is copied as is
    assert read_sidecar(result.model_file)["kind"] == "tensorrt"
    config = parse(schema, result.config_path)
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 4  # default 8, capped at the engine's profile max
    assert any("TensorRT 10.13.0.35 on NVIDIA L4" in note for note in result.notes)
    assert "--backend-config" not in result.docker_command


def test_engine_refusals(tmp_path: Path) -> None:
    engine = fake_engine(tmp_path / "m.engine", max_batch=4)
    with pytest.raises(ValueError, match=r"--max-batch 8 exceeds the engine's profile max batch 4"):
        write_repository(engine, tmp_path / "repo", TritonOptions(max_batch=8))
    with pytest.raises(ValueError, match=r"--kind cpu: a TensorRT engine runs only on a GPU"):
        write_repository(engine, tmp_path / "repo", TritonOptions(kind="cpu"))
    with pytest.raises(ValueError, match=r"--preferred-batch 6: .* 1\.\.4"):
        write_repository(engine, tmp_path / "repo", TritonOptions(preferred_batch=[2, 6]))
    min2 = fake_engine(tmp_path / "min2.engine", min_batch=2)
    with pytest.raises(ValueError, match=r"--min-batch 1"):
        write_repository(min2, tmp_path / "repo")


def test_version_compatible_engine_gets_the_backend_flag(tmp_path: Path) -> None:
    result = write_repository(fake_engine(tmp_path / "vc.engine", version_compatible=True), tmp_path / "repo")
    assert "--backend-config=tensorrt,version-compatible=true" in result.docker_command


def test_artifacts_triton_cannot_serve(tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"torchscript")
    write_sidecar(pt, make_sidecar(image_inputs(), kind="torchscript"))
    with pytest.raises(ValueError, match=r"'torchscript' artifact"):
        write_repository(pt, tmp_path / "repo")
    nms = conv_onnx(tmp_path / "nms.onnx", make_sidecar(image_inputs(), nms="trt"), efficient_nms=True)
    with pytest.raises(ValueError, match=r"EfficientNMS_TRT plugin, which ONNX Runtime cannot run"):
        write_repository(nms, tmp_path / "repo")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x0a\xff not protobuf")
    write_sidecar(junk, make_sidecar(image_inputs()))
    with pytest.raises(ValueError, match=r"junk.onnx is not a readable ONNX file"):
        write_repository(junk, tmp_path / "repo")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(b"onnx")
    with pytest.raises(FileNotFoundError, match=r"no metadata sidecar"):
        write_repository(bare, tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        write_repository(tmp_path / "missing.onnx", tmp_path / "repo")


def test_nms_trt_for_tensorrt11_is_plain_onnx(tmp_path: Path) -> None:
    """msad export onnx --nms trt --trt-version 11 writes ONNX NonMaxSuppression: ORT serves it."""
    metadata = make_sidecar(image_inputs(), nms="trt", trt_version=11, kind="onnx", artifact="det.onnx")
    result = write_repository(conv_onnx(tmp_path / "det.onnx", metadata), tmp_path / "repo")
    copied = read_sidecar(result.model_file)
    assert copied["artifact"] == "model.onnx"  # the copy's sidecar names the copy
    assert {k: v for k, v in copied.items() if k != "artifact"} == {
        k: v for k, v in metadata.items() if k != "artifact"
    }


def test_existing_version_needs_overwrite(tmp_path: Path) -> None:
    onnx_path = conv_onnx(tmp_path / "m.onnx", make_sidecar(image_inputs()))
    write_repository(onnx_path, tmp_path / "repo")
    with pytest.raises(FileExistsError, match=r"already exists; pass --overwrite"):
        write_repository(onnx_path, tmp_path / "repo")
    engine = fake_engine(tmp_path / "m.engine")  # same name "m", now an engine
    result = write_repository(engine, tmp_path / "repo", TritonOptions(overwrite=True))
    assert sorted(p.name for p in result.version_dir.iterdir()) == ["model.plan", "model.plan.json"]
    assert not list(result.model_dir.glob(".*tmp*"))


def test_bad_names_and_versions(tmp_path: Path) -> None:
    onnx_path = conv_onnx(tmp_path / "m.onnx", make_sidecar(image_inputs()))
    with pytest.raises(ValueError, match=r"--name 'a/b'"):
        write_repository(onnx_path, tmp_path / "repo", TritonOptions(name="a/b"))
    with pytest.raises(ValueError, match=r"--version must be a positive integer"):
        write_repository(onnx_path, tmp_path / "repo", TritonOptions(version=0))


def test_external_weights_are_copied(schema, tmp_path: Path) -> None:
    onnx_path = conv_onnx(tmp_path / "ext.onnx", make_sidecar(image_inputs()), external_data=True)
    result = write_repository(onnx_path, tmp_path / "repo")
    assert (result.version_dir / "ext.onnx.data").read_bytes() == (tmp_path / "ext.onnx.data").read_bytes()


def test_hand_written_config_matches_the_schema(schema, tmp_path: Path) -> None:
    """Without tritonclient the config is written by hand: it must parse to the same message."""
    from google.protobuf import text_format

    metadata = make_sidecar(image_inputs(), detection_outputs())
    options = TritonOptions(preferred_batch=[4, 8], kind="cpu")
    config, _ = model_config(Path("m.onnx"), metadata, "onnx", options, "m")
    by_hand = text_format.Parse("\n".join(_to_text(config)), schema.ModelConfig())
    through_schema = text_format.Parse(render_config(config), schema.ModelConfig())
    assert by_hand == through_schema
    assert by_hand.output[3].HasField("reshape")


def test_cli_prints_the_docker_command(schema, tmp_path: Path, capsys) -> None:
    onnx_path = conv_onnx(tmp_path / "model.onnx", make_sidecar(image_inputs()))
    repo = tmp_path / "repo"
    args = [
        "export",
        "triton",
        str(onnx_path),
        "--repo",
        str(repo),
        "--name",
        "det",
        "--preferred-batch",
        "2,4",
    ]
    assert main(args + ["--max-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002" in out
    assert f"-v {repo.resolve()}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3" in out
    assert "tritonserver --model-repository=/models" in out
    config = parse(schema, repo / "det" / "config.pbtxt")
    assert config.max_batch_size == 4 and list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert main(args) == 2  # the version folder exists now
    assert "already exists; pass --overwrite" in _stderr_line(capsys)


def test_cli_refuses_bad_options_in_one_line(tmp_path: Path, capsys) -> None:
    engine = fake_engine(tmp_path / "m.engine", max_batch=4)
    assert main(["export", "triton", str(engine), "--repo", str(tmp_path / "r"), "--max-batch", "16"]) == 2
    assert "profile max batch 4" in _stderr_line(capsys)
    with pytest.raises(SystemExit):
        main(["export", "triton", str(engine), "--repo", str(tmp_path / "r"), "--preferred-batch", "a,b"])
    assert "comma-separated batch sizes" in capsys.readouterr().err
