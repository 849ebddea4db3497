"""Inference runtime for services: load an artifact, preprocess, run a backend, postprocess.

``Detector.load(path)`` runs a checkpoint (PyTorch), an ONNX file (ONNX Runtime), a TensorRT engine
or an AOTInductor package with the same pre- and post-processing (:mod:`.preprocess`), and returns a
:class:`Result` per image. ``msad eval``, ``msad predict`` and ``msad serve`` run through it.
"""

from msad_deploy.runtime.backends import BACKEND_NAMES, BackendUnavailableError
from msad_deploy.runtime.detector import Detector
from msad_deploy.runtime.images import InvalidImageError, to_rgb_tensor
from msad_deploy.runtime.results import Result

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "Detector",
    "InvalidImageError",
    "Result",
    "to_rgb_tensor",
]
