"""``torchrun --nproc-per-node N -m msad_deploy.training RECIPE --config ... --out ...``."""

from __future__ import annotations

import argparse
import sys

from msad_deploy.cli import add_train_arguments, parse_with_overrides, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msad_deploy.training", description="Train an MSAD model (see msad train --help)."
    )
    add_train_arguments(parser)
    try:
        return run_train(parse_with_overrides(parser, argv))
    except (OSError, ValueError, FloatingPointError) as err:  # user-facing: one line, no traceback
        print(f"msad train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
