"""Which images of a dataset already decoded fine, so ``verify_images`` decodes each file only once.

One JSON file per (annotation file, image folder) pair, named by a hash of their absolute paths,
under ``$MSAD_CACHE_DIR/verify/`` (default ``~/.cache/msad-deploy/verify/``, or
``$XDG_CACHE_HOME/msad-deploy/verify/``). It maps each image file name to the file's size and
mtime_ns when it decoded, and the decoded width and height: a file whose size or mtime changed is
decoded again. Only good images are recorded, so bad ones are re-checked on every run (they are few,
and fixing them needs no cache clean-up). A cache that cannot be read or written is ignored: a warning
in the log, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_VERSION = 1


def cache_root() -> Path:
    """``$MSAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/msad-deploy``, else ``~/.cache/msad-deploy``."""
    if os.environ.get("MSAD_CACHE_DIR"):
        return Path(os.environ["MSAD_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "msad-deploy"


class VerifyCache:
    """Decoded sizes of the good images of one dataset, keyed by file name and checked by stat."""

    def __init__(self, ann_file: Path, image_dir: Path) -> None:
        self.ann_file = str(Path(ann_file).resolve())
        self.image_dir = str(Path(image_dir).resolve())
        key = hashlib.sha256(f"{self.ann_file}\0{self.image_dir}".encode()).hexdigest()[:24]
        self.path = cache_root() / "verify" / f"{key}.json"
        self.entries: dict[str, list[int]] = {}  # file name -> [size, mtime_ns, width, height]
        self.changed = False
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable image-verification cache %s (%s)", self.path, error)
            return
        if (
            isinstance(data, dict)
            and data.get("version") == _VERSION
            and data.get("ann_file") == self.ann_file
            and data.get("image_dir") == self.image_dir
            and isinstance(data.get("images"), dict)
        ):
            self.entries = data["images"]

    def lookup(self, name: str, stat: os.stat_result) -> tuple[int, int] | None:
        """(width, height) of ``name`` when it decoded before with this size and mtime; else None."""
        entry = self.entries.get(name)
        if (
            isinstance(entry, list)
            and len(entry) == 4
            and entry[:2] == [stat.st_size, stat.st_mtime_ns]
            and all(isinstance(value, int) for value in entry)
        ):
            return entry[2], entry[3]
        return None

    def store(self, name: str, stat: os.stat_result, size: tuple[int, int]) -> None:
        """Record that ``name`` (as described by ``stat``) decoded to ``size`` (width, height)."""
        self.entries[name] = [stat.st_size, stat.st_mtime_ns, int(size[0]), int(size[1])]
        self.changed = True

    def save(self) -> None:
        """Write the cache atomically if it changed; failure is logged, not raised."""
        if not self.changed:
            return
        payload = {
            "version": _VERSION,
            "ann_file": self.ann_file,
            "image_dir": self.image_dir,
            "images": self.entries,
        }
        temporary = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.stem, suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                json.dump(payload, stream, separators=(",", ":"))
            os.replace(temporary, self.path)
            self.changed = False
        except OSError as error:
            logger.warning(
                "could not write the image-verification cache %s (%s); the next run decodes the images again "
                "(set MSAD_CACHE_DIR to a writable folder to keep it)",
                self.path,
                error,
            )
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
