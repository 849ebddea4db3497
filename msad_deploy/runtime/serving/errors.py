"""The one error type of the serving layer: what a request is refused with, and how input errors map to it."""

from __future__ import annotations

from msad_deploy.data.coco import ImageTooLargeError


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def image_error(error: Exception) -> RequestError:
    """A Detector input error -> the 4xx that names it (413 over the pixel limit, else 400/422)."""
    if isinstance(error, ImageTooLargeError):
        return RequestError(413, str(error))
    text = str(error)
    if "at least" in text and "pixels" in text:
        return RequestError(422, text)
    return RequestError(400, text)
