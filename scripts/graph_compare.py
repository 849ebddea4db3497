"""Interleaved latency of several exported graphs (ONNX Runtime and OpenVINO), with their node counts.

    OMP_NUM_THREADS=1 python scripts/graph_compare.py A.onnx B.onnx C.xml [--calls 300] [--threads 2] [--e2e --size 640]
    python scripts/graph_compare.py fp32=S.onnx ext=S.onnx@graph_optimization_level=extended S-int8.onnx

Each ARTIFACT is ``[LABEL=]PATH[@option=value,...]``: the options go to the runtime backend
(``open_backend``: e.g. ``graph_optimization_level=extended`` for ONNX Runtime, ``streams=1`` for
OpenVINO), so one file can be timed under several settings. ONNX Runtime sessions get
``intra_op_num_threads=--threads``, OpenVINO ``inference_num_threads=--threads`` and the LATENCY hint.

Every artifact is fed the same frame (``--image``, prepared as at inference: resized, padded,
normalised; or random values), then called round-robin, one call each per round, the order rotating
from round to round (A B C, B C A, ...), so drift on a shared machine falls on all alike. The table
gives each artifact's median and p90 per call, its median ratio to the first artifact (the median of
the per-round ratios), the nodes of its file (ONNX nodes or IR ops without Parameter, Constant and
Result) and the nodes the runtime actually runs (ONNX Runtime's optimised graph, OpenVINO's
runtime model without Parameter, Constant and Result). ``--ops`` adds the count by op type.
Only ratios of one run are comparable: absolute times move by tens of percent on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msad_deploy.runtime.backends import backend_for, open_backend

# Not work the runtime schedules: graph inputs, outputs and constants.
NOT_RUN = frozenset({"Parameter", "Result", "Constant", "Const", "Input", "Output"})


@dataclass
class Entry:
    """One artifact under one set of backend options, with its call times (ms)."""

    label: str
    path: Path
    options: dict[str, Any]
    backend: Any = None
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    call: Any = None  # what one timed call runs: the network on the feeds, or (--e2e) the whole Detector
    times: list[float] = field(default_factory=list)
    file_ops: collections.Counter = field(default_factory=collections.Counter)
    run_ops: collections.Counter = field(default_factory=collections.Counter)


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_artifact(text: str) -> Entry:
    """``[LABEL=]PATH[@key=value,...]`` -> an Entry (the label defaults to the file name and options)."""
    label = None
    head, _, tail = text.partition("@")
    if "=" in head:
        label, head = head.split("=", 1)
    options = {}
    for item in filter(None, tail.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{text}: backend option {item!r} is not key=value")
        options[key] = _value(value)
    path = Path(head)
    return Entry(label or (path.name + (f"@{tail}" if tail else "")), path, options)


def file_ops(path: Path) -> collections.Counter:
    """Op types of the file as written: ONNX nodes, or IR ops (without Parameter/Constant/Result)."""
    if path.suffix == ".onnx":
        import onnx

        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    import openvino as ov

    model = ov.Core().read_model(str(path))
    return collections.Counter(
        op.get_type_name() for op in model.get_ordered_ops() if op.get_type_name() not in NOT_RUN
    )


def ort_optimized_ops(path: Path, threads: int, level: str) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs: its optimised model (``optimized_model_filepath``)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def openvino_runtime_ops(backend: Any) -> collections.Counter:
    """Layer types OpenVINO's compiled model executes (its runtime model, after the plugin's fusions)."""
    model = backend.compiled.get_runtime_model()
    counts: collections.Counter = collections.Counter()
    for op in model.get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        if kind not in NOT_RUN:
            counts[kind] += 1
    return counts


def open_entry(entry: Entry, threads: int, image: Path | None, size: int | None, e2e: bool = False) -> None:
    """Open the backend with the measuring settings and prepare its feeds (the same frame for all).
    ``e2e``: time ``Detector(frame)`` instead (resize, pad, normalise, network, decode, NMS, boxes in
    the frame's pixels), at test size ``size`` when given."""
    from msad_deploy.data.coco import decode_rgb
    from msad_deploy.data.transforms import pad_images, resize_image
    from msad_deploy.runtime import Detector

    name = backend_for(entry.path)
    options = dict(entry.options)
    if name == "onnxruntime":
        options.setdefault("intra_op_threads", threads)
        # interleaved with other runtimes, a spinning pool would take their cores (see msad bench)
        options.setdefault("allow_spinning", False)
    elif name == "openvino":
        options.setdefault("threads", threads)
        options.setdefault("performance_hint", "latency")
    entry.backend = backend = open_backend(entry.path, device="cpu", **options)
    spec = backend.spec
    if image is not None:
        frame = torch.from_numpy(decode_rgb(image)).permute(2, 0, 1).contiguous()
        frame = resize_image(frame, spec.test_min_size, spec.test_max_size)
    else:  # random pixels of the export size (or --size)
        side = size or (backend.input_size[0] if backend.input_size else spec.test_min_size)
        frame = torch.randint(0, 256, (3, side, side), dtype=torch.uint8)
    padded, sizes = pad_images([frame], spec.size_divisibility)
    entry.feeds = backend.feeds(padded, sizes)
    entry.call = lambda: backend.run(entry.feeds)
    if e2e:
        detector = Detector(backend, warmup=False, test_size=size)
        pixels = frame.permute(1, 2, 0).contiguous().numpy()
        entry.call = lambda: detector(pixels)
    entry.file_ops = file_ops(entry.path)
    if name == "onnxruntime":
        level = entry.options.get("graph_optimization_level", "all")
        entry.run_ops = ort_optimized_ops(entry.path, threads, level)
    elif name == "openvino":
        entry.run_ops = openvino_runtime_ops(backend)


def measure(entries: list[Entry], calls: int, warmup: int) -> list[list[float]]:
    """``calls`` rounds of one call per entry, the order rotated each round; per-round times (ms)."""
    for entry in entries:
        for _ in range(warmup):
            entry.call()
    rounds = []
    for index in range(calls):
        shift = index % len(entries)
        times = [0.0] * len(entries)
        for k in list(range(shift, len(entries))) + list(range(shift)):
            entry = entries[k]
            start = time.perf_counter()
            entry.call()
            times[k] = (time.perf_counter() - start) * 1e3
            entry.times.append(times[k])
        rounds.append(times)
    return rounds


def table(entries: list[Entry], rounds: list[list[float]], ops: bool) -> str:
    lines = [
        "| artifact | file nodes | runtime nodes | median ms | p90 ms | ratio to first | ratio of medians |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, entry in enumerate(entries):
        ratio = statistics.median(r[k] / r[0] for r in rounds)
        p90 = float(np.percentile(entry.times, 90))
        lines.append(
            f"| {entry.label} | {sum(entry.file_ops.values())} | {sum(entry.run_ops.values()) or '-'} | "
            f"{statistics.median(entry.times):.2f} | {p90:.2f} | {ratio:.3f} | "
            f"{statistics.median(entry.times) / statistics.median(entries[0].times):.3f} |"
        )
    if ops:
        for entry in entries:
            for title, counts in (("file", entry.file_ops), ("runtime", entry.run_ops)):
                if counts:
                    body = ", ".join(f"{op} {n}" for op, n in counts.most_common())
                    lines.append(f"\n{entry.label} ({title}): {body}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "artifacts",
        nargs="+",
        help="[LABEL=]PATH[@option=value,...]: an .onnx or .xml export with its sidecar; options go to the backend",
    )
    parser.add_argument("--calls", type=int, default=300, help="rounds (calls per artifact; default 300)")
    parser.add_argument(
        "--warmup", type=int, default=20, help="untimed calls per artifact first (default 20)"
    )
    parser.add_argument("--threads", type=int, default=2, help="runtime threads per artifact (default 2)")
    parser.add_argument("--image", type=Path, help="frame to feed (default: random pixels)")
    parser.add_argument(
        "--size", type=int, help="side of the random frame (default: the export's input size)"
    )
    parser.add_argument("--ops", action="store_true", help="also print the node count by op type")
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="time the whole Detector call on the frame (pre- and post-processing included) at test size "
        "--size, not the network alone",
    )
    parser.add_argument("--repeat", type=int, default=1, help="measure the whole set this many times")
    args = parser.parse_args()
    torch.set_num_threads(1)
    entries = [parse_artifact(text) for text in args.artifacts]
    for entry in entries:
        open_entry(entry, args.threads, args.image, args.size, args.e2e)
    what = "end to end (Detector)" if args.e2e else "network only"
    print(f"{args.calls} interleaved rounds, {what}, {args.threads} threads, warm-up {args.warmup}")
    for repeat in range(args.repeat):
        for entry in entries:
            entry.times = []
        rounds = measure(entries, args.calls, args.warmup)
        if args.repeat > 1:
            print(f"\nrun {repeat + 1} of {args.repeat}")
        print(table(entries, rounds, args.ops and repeat == 0))


if __name__ == "__main__":
    main()
