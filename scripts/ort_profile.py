"""Where an ONNX artifact's time goes in ONNX Runtime (CPU): node time per operator type.

    python scripts/ort_profile.py ARTIFACT.onnx --size 128 [--runs 50] [--threads 2]

``--size`` is the padded HR-frame side (a student's network sees it halved, as in ``msad bench``).
Runs the artifact ``--runs`` times on random input with ORT's profiler on and prints, per operator
type, the mean time per call and its share of all node time, and the share outside convolutions
(docs/BENCHMARKS.md quotes it for the demo's models). Profiling adds its own overhead per node, so
the shares matter here, not the absolute times.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from msad_deploy.runtime.artifacts import metadata_spec, read_sidecar


def profile(artifact: Path, size: int, runs: int, threads: int) -> tuple[dict[str, float], int]:
    """Mean node time per call (microseconds) by operator type, and nodes run per call."""
    spec = metadata_spec(read_sidecar(artifact))
    side = size // spec.input_divisor
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    values = {
        "images": rng.standard_normal((1, 3, side, side), dtype=np.float32),
        "image_sizes": np.array([[size, size]], dtype=np.float32),
    }
    feeds = {i.name: values[i.name] for i in session.get_inputs()}
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    total: collections.Counter[str] = collections.Counter()
    nodes = 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
            nodes += 1
    return {op: micros / runs for op, micros in total.items()}, nodes // runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path, help="an ONNX file exported by msad (with its .json sidecar)")
    parser.add_argument("--size", type=int, required=True, help="padded HR-frame side in pixels, e.g. 128")
    parser.add_argument("--runs", type=int, default=50, help="profiled calls (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    args = parser.parse_args()
    per_op, nodes = profile(args.artifact, args.size, args.runs, args.threads)
    whole = sum(per_op.values())
    print(f"{args.artifact} at {args.size}: {nodes} nodes per call, {whole / 1000:.2f} ms of node time")
    for op, micros in sorted(per_op.items(), key=lambda item: -item[1])[:12]:
        print(f"  {op:<24} {micros / 1000:7.3f} ms  {100 * micros / whole:5.1f} %")
    print(f"  outside Conv: {100 * (1 - per_op.get('Conv', 0.0) / whole):.0f} %")


if __name__ == "__main__":
    main()
