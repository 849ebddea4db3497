"""User errors and how the command line reports them: one line, a non-zero exit, no traceback.

A user mistake (a bad file, option, dataset, checkpoint, a full or read-only disk, a diverging
run) surfaces as one of ``USER_ERRORS``; ``run_command`` prints it as ``prog: error: message``
and exits 2 (130 for Ctrl-C). Anything else is a bug and keeps its traceback. Setting
``MSAD_DEBUG=1`` re-raises user errors too, for the full traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "MSAD_DEBUG"

# ValueError covers ConfigError and DataError; FloatingPointError a non-finite or diverging loss.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)

_OS_HINTS = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EROFS: "choose a writable output folder",
    errno.EACCES: "check the permissions or choose another path",
    errno.EDQUOT: "free some space or choose another output folder",
}


def describe_error(error: BaseException) -> str:
    """One line for a user error: OSErrors as 'cause: path (hint)', others as their message.

    Multi-line messages (e.g. an exception re-raised from a DataLoader worker) keep their last
    non-empty line, which is where Python puts the original exception's own text.
    """
    if isinstance(error, OSError) and error.strerror and not isinstance(error, (FileExistsError,)):
        cause = error.strerror[0].lower() + error.strerror[1:]
        where = f": {error.filename}" if error.filename else ""
        hint = _OS_HINTS.get(error.errno or -1)
        return f"{cause}{where}" + (f" ({hint})" if hint else "")
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines) if len(lines) > 1 else text


def run_command(prog: str, handler: Callable[[Any], int], args: Any) -> int:
    """Call ``handler(args)``; print user errors as one line (exit 2) unless MSAD_DEBUG is set."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return handler(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as error:
        if debug:
            raise
        print(
            f"{prog}: error: {describe_error(error)}  (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr
        )
        return 2
