"""``msad export aoti``: a checkpoint -> an AOTInductor package (``.pt2``) with NMS inside.

The same tensor-only graph as the ONNX export (network + decode + per-level top-k + clip), plus
class-aware NMS (``nms_select``, torchvision's NMS op), captured by ``torch.export`` and compiled
ahead of time by Inductor for the CPU or a CUDA GPU. The package needs torch and torchvision
(for the NMS op) to run, not this project's model code:

    import torch, torchvision
    run = torch._inductor.aoti_load_package("student.pt2")
    boxes, scores, labels, num_detections = run(images, image_sizes)

Inputs and outputs follow the ONNX artifacts (see export/wrappers.py and the sidecar). The package
also embeds the sidecar's content (``run.get_metadata()["msad_deploy"]``), as ONNX files do in their
``metadata_props``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msad_deploy.models.postprocess import Detections, nms_select
from msad_deploy.runtime.artifacts import ONNX_METADATA_KEY, atomic_path, tensor_info, write_sidecar
from msad_deploy.runtime.preprocess import inference_network

from .compare import BOX_TOL, graph_borderline, match_detections
from .metadata import base_metadata
from .onnx import (
    OnnxExportOptions,
    _dynamic_shapes,
    _example_inputs,
    load_for_export,
    resolve_input_size,
)
from .wrappers import ExportGraph

log = logging.getLogger("msad.export")


class DetectionsGraph(nn.Module):
    """``ExportGraph`` candidates + NMS -> (boxes [B, K, 4], scores [B, K], labels [B, K], num [B])."""

    def __init__(self, graph: ExportGraph) -> None:
        super().__init__()
        self.candidates = graph  # not "graph": torch.fx GraphModules own that name

    def forward(self, inputs: Tensor, image_sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        outputs = self.candidates(inputs, image_sizes)
        spec = self.candidates.spec
        found = nms_select(*outputs[:3], spec.nms_thresh, spec.max_detections)
        if self.candidates.preprocess is not None:  # boxes to frame pixels
            found = found._replace(boxes=found.boxes * outputs[3][:, None])
        return tuple(found)


@dataclass
class AotiExportOptions:
    input_size: tuple[int, int] | None = None
    batch: int = 1
    dynamic: bool = False
    preprocess: bool = False
    device: str = "cpu"
    branch: str | None = None
    test_size: int | None = None
    size_divisibility: int | None = None


def export_aoti(checkpoint: str | Path, out: str | Path, options: AotiExportOptions) -> dict[str, Any]:
    """Compile ``checkpoint`` into ``out`` (.pt2) + ``out.json``; checks the package against eager first."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".pt2":
        raise ValueError(f"--out {out} must end in .pt2 (AOTInductor packages are .pt2 archives)")
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device here; use --device cpu")
    onnx_like = OnnxExportOptions(
        input_size=options.input_size,
        batch=options.batch,
        dynamic=options.dynamic,
        preprocess=options.preprocess,
    )
    onnx_like.validate()
    loaded, spec = load_for_export(checkpoint, options.branch)
    spec = spec.at_input(options.test_size, options.size_divisibility)
    size = resolve_input_size(spec, onnx_like)
    network = inference_network(loaded.model.eval(), spec).eval()
    graph = ExportGraph(network, spec, "candidates", preprocess=options.preprocess).eval()
    module = DetectionsGraph(graph).to(device).eval()
    example = tuple(t.to(device) for t in _example_inputs(graph, spec, size, options.batch, options.dynamic))
    shapes = _dynamic_shapes(graph, spec, options.dynamic)
    names = graph.input_names()
    inputs = [
        tensor_info(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in zip(names, example)
    ]
    if options.dynamic:
        inputs[0]["shape"] = ["batch", 3, "height", "width"]
        for entry in inputs[1:]:
            entry["shape"][0] = "batch"
    batch = "batch" if options.dynamic else options.batch
    k = spec.max_detections
    metadata = base_metadata("aoti", out, spec, checkpoint)
    metadata.update(
        inputs=inputs,
        outputs=[
            tensor_info("boxes", "float32", [batch, k, 4]),
            tensor_info("scores", "float32", [batch, k]),
            tensor_info("labels", "int64", [batch, k]),
            tensor_info("num_detections", "int64", [batch]),
        ],
        nms="torchvision",
        preprocess=options.preprocess,
        precision="fp32",
        device=device.type,
        input_size=list(size),
        batch=None if options.dynamic else options.batch,
        dynamic=options.dynamic,
    )
    # The package carries its own metadata (read back with get_metadata()), so the runtime can tell a
    # sidecar that belongs to another export from this package's own.
    embedded = {ONNX_METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
        with atomic_path(out) as tmp:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": embedded}
            )
            check = compare_package(tmp, module, example)
    metadata["verify"] = check
    write_sidecar(out, metadata)
    log.info("compiled %s for %s (%s)", out, device.type, check)
    return metadata


@contextlib.contextmanager
def _full_fp32(device: torch.device):
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (CUDA only; restored after)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with cudnn.flags(
            enabled=cudnn.enabled,
            benchmark=cudnn.benchmark,
            deterministic=cudnn.deterministic,
            allow_tf32=False,
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def compare_package(
    path: Path, module: DetectionsGraph, example: tuple, box_tol: float = BOX_TOL
) -> dict[str, Any]:
    """Run the compiled package and the eager module on ``example``; raise if their detections differ.

    Compared as sets (:func:`~msad_deploy.export.compare.match_detections`, the rule ONNX verification
    uses): the same class, boxes within ``box_tol`` px and scores within 1e-4 pair up in any order, so
    two near-tied scores that swap places between eager and compiled code do not fail the export.

    On CUDA both run in full fp32 (TF32 off for the comparison only): eager and compiled code pick
    different convolution algorithms, and TF32's rounding would differ between them by more than the
    tolerance, which says nothing about the compilation.
    """
    device = example[0].device
    index = device.index if device.index is not None else -1
    with _full_fp32(device), torch.no_grad():
        run = torch._inductor.aoti_load_package(str(path), device_index=index)
        ours = Detections(*run(*example))
        reference = Detections(*module(*example))

    def near():  # run only if a detection is left unpaired
        with _full_fp32(device):
            return graph_borderline(module.candidates, *example)

    match = match_detections(ours, reference, box_tol=box_tol, borderline=near)
    if not match.passed:
        raise RuntimeError(
            f"the compiled package disagrees with eager PyTorch ({match.note}); not writing {path.name}"
        )
    return {
        "max_box_error_px": match.max_box_error,
        "max_score_error": match.max_score_error,
        "detections": int(reference.num_detections.sum()),
        "at_boundary": match.at_boundary,
        "passed": True,
    }


def register_aoti(sub) -> None:
    from .cli import _size

    aoti = sub.add_parser(
        "aoti",
        help="checkpoint -> AOTInductor package (.pt2) with NMS, for the CPU or CUDA",
        description=(
            "Capture the deployable model (network, decode, top-k, clip and NMS) with torch.export and compile it "
            "ahead of time with Inductor into FILE.pt2 (+ FILE.pt2.json). The package runs with torch and "
            "torchvision alone (torch._inductor.aoti_load_package), is checked against eager PyTorch before it is "
            "written, and returns boxes [B,K,4], scores [B,K], labels [B,K], num_detections [B]."
        ),
    )
    aoti.set_defaults(handler=_run_aoti)
    aoti.add_argument("checkpoint", type=Path, help="checkpoint written by msad train")
    aoti.add_argument("--out", type=Path, required=True, help="package to write (.pt2)")
    aoti.add_argument(
        "--input-size", type=_size, help="HxW of the padded HR-frame input (default: the test size)"
    )
    aoti.add_argument("--batch", type=int, default=1, help="fixed batch size (default 1)")
    aoti.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial size")
    aoti.add_argument(
        "--preprocess", action="store_true", help="uint8 frames [B,H,W,3] in (fixed --input-size)"
    )
    aoti.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="target device (default cpu)")
    from .cli import add_input_arguments

    add_input_arguments(aoti)
    aoti.add_argument(
        "--branch", choices=["fused", "hr", "lr"], help="teacher checkpoints: the branch to export"
    )


def _run_aoti(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("msad").setLevel(logging.INFO)  # ours; the ONNX tooling's INFO chatter stays off
    options = AotiExportOptions(
        args.input_size,
        args.batch,
        args.dynamic,
        args.preprocess,
        args.device,
        args.branch,
        args.test_size,
        args.size_divisibility,
    )
    metadata = export_aoti(args.checkpoint, args.out, options)
    print(
        f"wrote {args.out} and {args.out}.json ({metadata['device']}; max box error vs eager "
        f"{metadata['verify']['max_box_error_px']:.3g} px)"
    )
    return 0
