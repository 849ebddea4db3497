"""``torchrun --nproc-per-node N -m msad_deploy.training RECIPE --config ... --out ...``."""

from __future__ import annotations

import argparse
import sys

from msad_deploy.training.cli import add_train_arguments, run_train

from msad_deploy.cli import parse_with_overrides
from msad_deploy.errors import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m msad_deploy.training", description="Train an MSAD model (see msad train --help)."
    )
    add_train_arguments(parser)
    return run_command("msad train", run_train, parse_with_overrides(parser, argv))


if __name__ == "__main__":
    sys.exit(main())
