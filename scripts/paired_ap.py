"""AP(A) - AP(B) with its paired bootstrap interval, from two per-image evaluations of the same images.

    python scripts/paired_ap.py A.npz B.npz [--resamples 1000] [--seed 0]

A and B are the ``.npz`` files ``msad eval --save-per-image`` writes (the same images, e.g. two models
or two exports on one validation split). Both are resampled with the same image draws, so the
interval of the difference is much narrower than the two AP intervals side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from msad_deploy.evaluation.bootstrap import DEFAULT_RESAMPLES, PerImageEval, paired_ap_difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="per-image evaluation of A (.npz)")
    parser.add_argument("b", type=Path, help="per-image evaluation of B (.npz), the same images")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args()
    a, b = PerImageEval.load(args.a), PerImageEval.load(args.b)
    difference, (low, high) = paired_ap_difference(a, b, args.resamples, args.seed)
    print(
        f"AP {a.ap():.2f} - {b.ap():.2f} = {difference:+.2f} [{low:+.2f}, {high:+.2f}] "
        f"(95 % paired bootstrap, {args.resamples} resamples of {a.num_images} images, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
