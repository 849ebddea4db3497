"""``msad export verify``: an ONNX artifact (ONNX Runtime) or an OpenVINO IR (OpenVINO) against eager
PyTorch, as a pass/fail table.

Both kinds are the same graph (the IR is converted from the ONNX export) and are checked the same way,
each through its own runtime backend. Checks (fp32 limits; fp16 and int8 artifacts are held to their
AP bound, their tensor differences reported only):
- random images at the export size (and at a second size for dynamic artifacts): pre-NMS
  tensors (``boxes``/``scores`` of raw artifacts, the intermediate ``decoded_boxes``/``decoded_scores``
  of the others) within rtol 1e-3 / atol 1e-4, and the same detections after NMS, matched as sets
  (:func:`~msad_deploy.export.compare.match_detections`: same class, boxes within 0.01 px, scores
  within 1e-4, near-ties in any order, one detection entering or leaving only at a boundary);
- with ``--data``: COCO AP of the artifact and of the eager model through the same loader,
  preprocessing and decoding, equal within 0.1 AP (fp32), 0.5 (fp16) or 1.5 (int8): the paired 95 %
  bootstrap interval of the difference (both scored on the same image resamples) must lie inside
  that bound, so a small dataset cannot pass a change it cannot resolve (``bootstrap=0``: the point
  difference alone).
- fp16 and int8: their outputs must be well-formed on the random images (finite boxes with x2 >= x1
  and y2 >= y1, scores within [0, 1], labels of the spec's classes and -1 on padding rows,
  num_detections within [0, K]). Without ``--data`` that is what passes them; the report then says
  that their AP bound was not checked and how to check it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from msad_deploy.evaluation.bootstrap import DEFAULT_RESAMPLES, ap_samples, percentile_interval
from msad_deploy.evaluation.coco_eval import evaluate_detections, inference_on_dataset
from msad_deploy.evaluation.evaluator import (
    BatchPredictor,
    DetectorPredictor,
    build_eval_loader,
    check_model_matches_data,
)
from msad_deploy.models.build import load_model
from msad_deploy.models.postprocess import Detections, decode, nms_select
from msad_deploy.models.spec import InferenceSpec
from msad_deploy.runtime.artifacts import metadata_spec, read_sidecar
from msad_deploy.runtime.backends.base import GraphBackend
from msad_deploy.runtime.backends.onnxruntime import OnnxRuntimeBackend
from msad_deploy.runtime.detector import Detector
from msad_deploy.runtime.preprocess import inference_network, preprocess

from .compare import graph_borderline, match_detections, threshold_borderline
from .wrappers import ExportGraph

AP_LIMITS = {"fp32": 0.1, "fp16": 0.5, "int8": 1.5}


@dataclass
class Check:
    name: str
    value: float | None
    limit: float | None
    passed: bool | None  # None: skipped
    note: str = ""
    # the AP check: {"eager": AP, "artifact": AP, "difference": artifact - eager} and with the bootstrap
    # on "eager_ci95", "artifact_ci95", "difference_ci95" ([low, high]) and "resamples", "seed"
    ap: dict[str, Any] | None = None


def _random_batch(
    spec: InferenceSpec, size: tuple[int, int], batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images resized into the padded HR-frame size: (padded [B, 3, H, W], sizes [B, 2])."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    shapes = [(height, width), (height - spec.size_divisibility // 2, width)][:batch]
    shapes += [shapes[-1]] * (batch - len(shapes))
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in shapes]
    padded = torch.zeros(batch, 3, height, width, dtype=torch.uint8)
    for i, image in enumerate(images):
        padded[i, :, : image.shape[1], : image.shape[2]] = image
    return padded, torch.tensor(shapes)


def _compare(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[float, bool]:
    error = float((a - b).abs().max()) if a.numel() else 0.0
    return error, bool(torch.allclose(a, b, rtol=rtol, atol=atol))


def _nms_check(
    label: str, ours: Detections, ref: Detections, box_tol: float, exact: bool, borderline
) -> Check:
    """Detections after NMS, matched as sets (:func:`~msad_deploy.export.compare.match_detections`)."""
    match = match_detections(ours, ref, box_tol=box_tol, borderline=borderline)
    value = match.max_box_error if match.passed else None
    return Check(
        f"detections after NMS ({label})", value, box_tol, match.passed if exact else None, match.note
    )


def runner_for(artifact: str | Path, metadata: dict[str, Any], **options: Any) -> GraphBackend:
    """The runtime backend that runs ``artifact`` (by its sidecar's kind): ONNX Runtime or OpenVINO."""
    kind = metadata.get("kind", "onnx")
    if kind == "onnx":
        return OnnxRuntimeBackend(artifact, metadata, **options)
    if kind == "openvino":
        from msad_deploy.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(artifact, metadata, device="cpu", **options)
    raise ValueError(
        f"{artifact} is a {kind!r} artifact; msad export verify checks ONNX graphs and OpenVINO IRs (AOTInductor "
        "packages are checked against eager when they are compiled; verify a TensorRT engine's ONNX source)"
    )


def verify_artifact(
    artifact: str | Path,
    checkpoint: str | Path | None = None,
    data: str | Path | None = None,
    split: str = "val",
    ap_limit: float | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    box_tol: float = 0.01,
    batch_size: int = 4,
    progress: bool = False,
    bootstrap: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """Run the checks; returns ``{"artifact", "precision", "checks": [...], "passed": bool}``.

    ``artifact``: an ``.onnx`` graph or an OpenVINO ``.xml`` IR with its sidecar. ``bootstrap``: image
    resamples for the AP check's paired interval (0: point difference only)."""
    metadata = read_sidecar(artifact)
    checkpoint = Path(checkpoint or metadata["source_checkpoint"])
    loaded = load_model(checkpoint)
    spec = metadata_spec(metadata)
    if loaded.spec.num_classes != spec.num_classes or loaded.spec.arch != spec.arch:
        raise ValueError(f"{artifact} was not exported from {checkpoint} (architecture or classes differ)")
    network = inference_network(loaded.model, spec).eval()
    precision = metadata["precision"]
    exact = precision == "fp32"
    checks: list[Check] = []
    if metadata["nms"] == "trt":
        checks.append(
            Check(
                "random inputs", None, None, None, "EfficientNMS_TRT runs only in TensorRT: verify the engine"
            )
        )
    elif metadata["preprocess"]:
        checks += _check_frames(artifact, metadata, network, spec, rtol, atol, box_tol, exact)
    else:
        checks += _check_random(artifact, metadata, network, spec, rtol, atol, box_tol, exact)
    if data is None and not exact and metadata["nms"] != "trt":
        limit = ap_limit or AP_LIMITS[precision]
        checks.append(
            Check(
                "COCO AP difference",
                None,
                limit,
                None,
                f"not checked: {precision} is held to an AP bound ({limit:g}), which needs a dataset; "
                "give --data DATASET to check it",
            )
        )
    if data is not None and metadata["nms"] != "trt":
        checks += _check_ap(
            artifact,
            metadata,
            loaded,
            spec,
            Path(data),
            split,
            ap_limit or AP_LIMITS[precision],
            batch_size,
            progress,
            bootstrap,
            bootstrap_seed,
        )
    ran = [c for c in checks if c.passed is not None]
    ap = next((c.ap for c in checks if c.ap is not None), None)
    return {
        "ap": ap,
        "artifact": str(artifact),
        "checkpoint": str(checkpoint),
        "precision": precision,
        "checks": [asdict(c) for c in checks],
        "passed": bool(ran) and all(c.passed for c in ran),
    }


def _well_formed(label: str, outputs: dict[str, torch.Tensor], spec: InferenceSpec, raw: bool) -> Check:
    """Reduced precision: outputs of the contract's ranges (see the module docstring)."""
    problems = []
    boxes = outputs["boxes"].double()
    if not bool(torch.isfinite(boxes).all()):
        problems.append("non-finite boxes")
    scores = outputs["scores"].double()
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        problems.append("scores outside [0, 1]")
    if not raw:
        k = boxes.shape[1]
        num, labels = outputs["num_detections"].long(), outputs["labels"].long()
        if not bool(((num >= 0) & (num <= k)).all()):
            problems.append(f"num_detections outside [0, {k}]")
        valid = torch.arange(k)[None] < num.clamp(0, k)[:, None]
        if not bool(((labels[valid] >= 0) & (labels[valid] < spec.num_classes)).all()):
            problems.append(f"labels outside [0, {spec.num_classes})")
        if not bool((labels[~valid] == -1).all()):
            problems.append("padding rows not labelled -1")
        kept = boxes[valid]
        if not bool(((kept[:, 2] >= kept[:, 0]) & (kept[:, 3] >= kept[:, 1])).all()):
            problems.append("boxes with x2 < x1 or y2 < y1")
        note = f"{int(num.sum())} detections"
    else:
        note = f"{scores.shape[1]} locations"
    ok = not problems
    return Check(f"outputs well-formed ({label})", None, None, ok, note if ok else "; ".join(problems))


def _check_random(artifact, metadata, network, spec, rtol, atol, box_tol, exact) -> list[Check]:
    stage = "raw" if metadata["nms"] == "none" else "candidates"
    graph = ExportGraph(network, spec, stage).eval()
    extra = () if stage == "raw" else ("decoded_boxes", "decoded_scores")
    runner = runner_for(artifact, metadata, extra_outputs=extra)
    size = tuple(metadata["input_size"])
    sizes = [size]
    if metadata["dynamic"]:
        sizes.append((size[0] + spec.size_divisibility, size[1]))
    checks = []
    for index, hw in enumerate(sizes):
        batch = metadata.get("batch") or 2
        padded, image_sizes = _random_batch(spec, hw, batch, seed=index)
        feeds = runner.feeds(padded, image_sizes)
        outputs = {k: torch.from_numpy(v) for k, v in runner.run(feeds).items()}
        with torch.no_grad():
            reference = graph(*(torch.from_numpy(feeds[name]) for name in runner.input_names))
        label = f"{hw[0]}x{hw[1]} batch {batch}"
        if stage == "raw":
            pairs = list(zip(("boxes", "scores"), reference, strict=True))
        else:
            ref_boxes, ref_scores, ref_labels = reference[:3]
            pairs = list(zip(("decoded_boxes", "decoded_scores"), reference[-2:], strict=True))
        for name, ref in pairs:
            error, ok = _compare(outputs[name], ref, rtol, atol)
            checks.append(
                Check(
                    f"{name} ({label})", error, atol, ok if exact else None, "" if exact else "reported only"
                )
            )
        if not exact:
            checks.append(_well_formed(label, outputs, spec, raw=stage == "raw"))
        if stage == "candidates":
            ref_det = nms_select(ref_boxes, ref_scores, ref_labels, spec.nms_thresh, spec.max_detections)
            ours = Detections(*(outputs[k] for k in ("boxes", "scores", "labels", "num_detections")))
            graph_inputs = [torch.from_numpy(feeds[name]) for name in runner.input_names]
            near = partial(graph_borderline, graph, *graph_inputs)  # run only if a detection is unpaired
            checks.append(_nms_check(label, ours, ref_det, box_tol, exact, near))
    return checks


def _check_frames(artifact, metadata, network, spec, rtol, atol, box_tol, exact) -> list[Check]:
    """In-graph preprocessing, at the export frame size and (dynamic artifacts) a second, odd size:

    1. the graph's network input against :func:`preprocess` (the Python path): the resize is the
       same computation, but ONNX Runtime rounds a few pixels one uint8 level differently, so at
       most one level on at most 0.1 % of the values;
    2. the rest of the graph exactly: eager PyTorch run on the graph's own network input gives the
       same outputs (detections within box_tol, or raw tensors within rtol/atol).
    """
    from msad_deploy.runtime.preprocess import PreparedBatch, postprocess

    runner = runner_for(artifact, metadata, extra_outputs=("network_input",))
    height, width = metadata["input_size"]
    sizes = [(height, width)] + ([(height + 61, max(16, width - 37))] if metadata["dynamic"] else [])
    batch = metadata.get("batch") or 1
    level = 1.0 / 255.0 / min(spec.pixel_std)  # one uint8 level in normalised units
    checks = []
    for index, (h, w) in enumerate(sizes):
        g = torch.Generator().manual_seed(index)
        frames = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=g)
        outputs = {k: torch.from_numpy(v) for k, v in runner.run({"frames": frames.numpy()}).items()}
        prepared = preprocess(list(frames.permute(0, 3, 1, 2)), spec)
        label = f"frames {h}x{w} batch {batch}"
        if not exact:
            checks.append(_well_formed(label, outputs, spec, raw=metadata["nms"] == "none"))
        difference = (outputs["network_input"] - prepared.inputs).abs()
        share = float((difference > 1e-4).float().mean())
        ok = float(difference.max()) <= level * 1.001 and share <= 1e-3
        note = f"{share:.2%} of values differ (limit 0.1 %)"
        checks.append(
            Check(
                f"network input vs Python preprocessing ({label})", float(difference.max()), level, ok, note
            )
        )
        graph_input = PreparedBatch(outputs["network_input"], prepared.image_sizes, prepared.original_sizes)
        with torch.no_grad():
            raw = network(graph_input.inputs)
        if metadata["nms"] == "none":
            boxes, scores = decode(raw, spec.strides, spec.score_thresh)
            ratio = (prepared.original_sizes / prepared.image_sizes)[:, None, [1, 0, 1, 0]]
            for name, ref in (("boxes", boxes * ratio), ("scores", scores)):
                error, ok = _compare(outputs[name], ref, rtol, atol)
                checks.append(Check(f"{name} ({label})", error, atol, ok if exact else None))
            continue
        reference = postprocess(raw, graph_input, spec)
        ours = Detections(*(outputs[k] for k in ("boxes", "scores", "labels", "num_detections")))
        ratio = (prepared.original_sizes / prepared.image_sizes)[:, [1, 0, 1, 0]]
        near = threshold_borderline(raw, spec, graph_input.image_sizes, box_scale=ratio)
        checks.append(_nms_check(label, ours, reference, box_tol, exact, near))
    return checks


def _check_ap(
    artifact, metadata, loaded, spec, data, split, limit, batch_size, progress, bootstrap=0, seed=0
) -> list[Check]:
    images, annotations = data / split, data / "annotations" / f"instances_{split}.json"
    if metadata["preprocess"]:
        return [
            Check(
                "COCO AP",
                None,
                limit,
                None,
                "in-graph preprocessing artifacts: AP through `msad eval --model`",
            )
        ]
    config = loaded.config  # its data settings (area ranges, on_bad); the spec decides the input path
    config.data.num_workers = 0
    dataset, loader = build_eval_loader(config, images, annotations, batch_size, 0)
    check_model_matches_data(spec, dataset, str(artifact))
    area_scale = config.data.eval_area_range_scale
    # The artifact is measured through the runtime's Detector: the path that is deployed.
    detector = Detector(runner_for(artifact, metadata), warmup=False)
    results, matching = {}, {}
    predictors = (("eager", BatchPredictor(loaded.model, spec)), ("artifact", DetectorPredictor(detector)))
    for name, predict in predictors:
        records = inference_on_dataset(predict, loader, dataset.label_to_category_id, progress=progress)
        metrics, matching[name] = evaluate_detections(
            dataset.coco, records, dataset.image_ids, area_range_scale=area_scale, per_image=True
        )
        results[name] = metrics["AP"]
    difference = results["artifact"] - results["eager"]
    ap: dict[str, Any] = {**results, "difference": difference}
    note = f"AP eager {results['eager']:.2f}, artifact {results['artifact']:.2f}"
    if not bootstrap:
        value = abs(difference)
        return [Check("COCO AP difference", value, limit, value <= limit, note, ap=ap)]
    # the same image resamples for both (same seed, same images): a paired difference
    samples = {name: ap_samples(matching[name], bootstrap, seed) for name in results}
    for name in results:
        ap[f"{name}_ci95"] = list(percentile_interval(samples[name]))
    low, high = percentile_interval(samples["artifact"] - samples["eager"])
    ap.update(difference_ci95=[low, high], resamples=bootstrap, seed=seed)
    value = max(abs(low), abs(high))  # the interval's far end: inside the bound, or not
    note = (
        f"AP eager {results['eager']:.2f} [{_span(ap['eager_ci95'])}], artifact {results['artifact']:.2f} "
        f"[{_span(ap['artifact_ci95'])}]; artifact - eager {difference:+.2f} [{low:+.2f}, {high:+.2f}] "
        f"(paired 95 % interval, {bootstrap} image resamples) must lie inside +-{limit:g}"
    )
    passed = -limit <= low and high <= limit
    return [Check("COCO AP difference", value, limit, passed, note, ap=ap)]


def _span(interval) -> str:
    return ", ".join("nan" if v is None else f"{v:.2f}" for v in interval)


def format_report(report: dict[str, Any]) -> str:
    rows = [f"verify {report['artifact']} ({report['precision']}) against {report['checkpoint']}"]
    for check in report["checks"]:
        state = {True: "PASS", False: "FAIL", None: "skip"}[check["passed"]]
        value = "-" if check["value"] is None else f"{check['value']:.3g}"
        limit = "-" if check["limit"] is None else f"{check['limit']:.3g}"
        rows.append(f"  {state:<5}{check['name']:<52}{value:>10} <= {limit:<8}{check['note']}")
    rows.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(rows)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(report, default=float).replace("Infinity", "null"))
    Path(path).write_text(json.dumps(clean, indent=2) + "\n")


TABLE_BEGIN = "<!-- export-table:begin -->"
TABLE_END = "<!-- export-table:end -->"


def _worst(checks: list[dict], *names: str) -> str:
    values = [c["value"] for c in checks if c["name"].split(" (")[0] in names and c["value"] is not None]
    return f"{max(values):.2g}" if values else "-"


def _ap_cell(ap: dict[str, Any] | None, name: str) -> str:
    """ "12.50", with its interval when the report has one: "12.50 [11.02, 14.01]"."""
    if not ap:
        return "-"
    interval = ap.get(f"{name}_ci95")
    return f"{ap[name]:.2f}" + (f" [{_span(interval)}]" if interval else "")


def report_table(folder: str | Path) -> str:
    """Markdown table of every ``*.verify.json`` under ``folder``: AP (with its 95 % interval), the AP
    change (with its paired interval) against its limit, largest errors. Reports written before the
    intervals existed show the AP alone."""
    rows = [
        "| artifact | precision | AP eager | AP artifact | AP change (limit) | max box error (px) | "
        "max score error | detections after NMS | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(Path(folder).glob("*.verify.json")):
        report = json.loads(path.read_text())
        checks, ap = report["checks"], report.get("ap")
        limit = next((c["limit"] for c in checks if c["name"] == "COCO AP difference"), None)
        eager = _ap_cell(ap, "eager")
        artifact = _ap_cell(ap, "artifact")
        change = "-"
        if ap:
            interval = ap.get("difference_ci95")
            around = f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval and None not in interval else ""
            change = f"{ap['artifact'] - ap['eager']:+.2f}{around} ({limit:g})"
        nms = [c for c in checks if c["name"].startswith("detections")]
        same = all(c["value"] is not None and c["value"] <= (c["limit"] or 0) for c in nms)
        agree = ("same" if same else "differ") if nms else "-"
        rows.append(
            f"| {Path(report['artifact']).name} | {report['precision']} | {eager} | {artifact} | {change} | "
            f"{_worst(checks, 'decoded_boxes', 'boxes')} | {_worst(checks, 'decoded_scores', 'scores')} | {agree} | "
            f"{'pass' if report['passed'] else 'FAIL'} |"
        )
    return "\n".join(rows)


def update_markdown(folder: str | Path, page: str | Path) -> None:
    """Replace the marked table of ``page`` with :func:`report_table` of ``folder``."""
    page = Path(page)
    text = page.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"{page} has no {TABLE_BEGIN} ... {TABLE_END} block to update")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    page.write_text(f"{head}{TABLE_BEGIN}\n{report_table(folder)}\n{TABLE_END}{tail}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Render the verify reports of a folder as a Markdown table.")
    parser.add_argument("folder", type=Path, help="folder of *.verify.json reports")
    parser.add_argument("--update", type=Path, help="rewrite the marked table of this Markdown page")
    args = parser.parse_args()
    if args.update:
        update_markdown(args.folder, args.update)
    else:
        print(report_table(args.folder))
