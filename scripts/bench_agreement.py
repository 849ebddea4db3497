"""Do two `msad bench` passes agree? Each model's end-to-end p50 over the reference model's (the
student/HR ratios of docs/BENCHMARKS.md), cell by cell, and the cells each pass flagged unstable.

    python scripts/bench_agreement.py PASS_A PASS_B [--reference hr] [--tolerance 0.10]

PASS_A and PASS_B are `msad bench --out` folders of the same matrix. Prints one line per ratio
(A, B, B/A - 1, ⚠ where either pass flagged a cell of it), then how many ratios agree within
``--tolerance`` among the cells neither pass flagged, and the largest disagreement. Exit status 0
either way: this reports a measurement, it does not judge a build.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from msad_deploy.benchmarks.report import latency_ratios, read_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pass_a", type=Path, help="an msad bench --out folder")
    parser.add_argument("pass_b", type=Path, help="another msad bench --out folder, same matrix")
    parser.add_argument("--reference", default="hr", help="the model ratios are taken to (default hr)")
    parser.add_argument(
        "--tolerance", type=float, default=0.10, help="relative agreement asked of each ratio (default 0.10)"
    )
    args = parser.parse_args(argv)
    found = []
    for folder in (args.pass_a, args.pass_b):
        rows = list(read_jsonl(folder / "results.jsonl").values())
        if not rows:
            parser.error(f"{folder}/results.jsonl holds no rows")
        found.append(latency_ratios(rows, args.reference))
    a, b = found
    common = [key for key in a if key in b]
    if not common:
        parser.error(f"the two passes share no cell with a {args.reference!r} row to take a ratio to")
    worst, agree, clean = 0.0, 0, 0
    print(f"{'model':<14} {'backend':<12} {'prec':<5} {'size':>5} {'A':>6} {'B':>6} {'B/A-1':>7}")
    for key in common:
        model, backend, precision, _batch, _device, size = key
        ra, rb = a[key]["ratio"], b[key]["ratio"]
        change = rb / ra - 1
        flagged = a[key]["unstable"] or b[key]["unstable"]
        if not flagged:
            clean += 1
            agree += abs(change) <= args.tolerance
            worst = max(worst, abs(change))
        print(
            f"{model:<14} {backend:<12} {precision:<5} {size!s:>5} {ra:6.3f} {rb:6.3f} {change:+7.1%}"
            + (" ⚠" if flagged else "")
        )
    print(
        f"\n{agree} of {clean} ratios of unflagged cells agree within {args.tolerance:.0%} "
        f"(largest difference {worst:.1%}); {len(common) - clean} ratios involve a flagged cell."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
