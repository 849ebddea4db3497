"""What ``msad info`` reports: versions, devices, importable backends, and a model's cost."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "pycocotools",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "onnx-graphsurgeon",
    "openvino",
    "nncf",
    "tensorrt",
    "tensorrt-lean",
    "cuda-python",
)
# backend name -> module that must import for it to work
BACKEND_MODULES = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "tensorrt": "tensorrt",
    "tensorrt_lean": "tensorrt_lean",
}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _backend_status(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an installed but broken backend should be reported, not crash info
        return f"not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if module_name == "onnxruntime":
        return "ok, providers: " + ", ".join(module.get_available_providers())
    if module_name == "openvino":
        return "ok, devices: " + ", ".join(module.Core().available_devices)
    return "ok"


def environment_info() -> dict[str, Any]:
    """Versions of Python and the relevant libraries, visible devices and importable backends."""
    import torch

    from msad_deploy import __version__

    devices = ["cpu"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
            )
    return {
        "msad_deploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in DISTRIBUTIONS},
        "torch_cuda": torch.version.cuda,
        "devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "backends": {name: _backend_status(module) for name, module in BACKEND_MODULES.items()},
    }


def model_info(
    model: str, overrides: list[str] | None = None, input_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Cost of a model given as a checkpoint or a config YAML (plus overrides) at ``input_size``."""
    from msad_deploy.config import load_config
    from msad_deploy.models.build import build_model, load_model
    from msad_deploy.models.cost import model_cost

    path = Path(model)
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path, overrides)
        config.model.pretrained = False  # cost does not depend on weights
        net = build_model(config.model)
    else:
        net, _, config, _ = load_model(path, overrides=overrides)
    shift = config.model.pyramid_shift
    if input_size is None:
        # The largest test image in the HR frame (short side x max size), at the model's input scale.
        from msad_deploy.models.spec import InferenceSpec

        divisor = InferenceSpec.from_config(config).input_divisor
        input_size = (config.input.test_min_size // divisor, config.input.test_max_size // divisor)
    cost = model_cost(net, tuple(input_size))
    return {
        "source": str(path),
        "arch": config.model.arch,
        "backbone": config.model.backbone,
        "pyramid_shift": shift,
        **cost.to_dict(),
    }


def format_info(report: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`environment_info` (+ :func:`model_info`)."""
    env = report["environment"]
    lines = [
        f"msad-deploy {env['msad_deploy']}  python {env['python']}  ({env['platform']})",
        "versions:",
        *[f"  {name:<18} {version or '-'}" for name, version in env["versions"].items()],
        f"torch CUDA build: {env['torch_cuda'] or 'none'}   CPU threads: {env['cpu_threads']}",
        "devices:",
        *[f"  {device}" for device in env["devices"]],
        "backends:",
        *[f"  {name:<18} {status}" for name, status in env["backends"].items()],
    ]
    if "model" in report:
        m = report["model"]
        height, width = m["input_size"]
        lines += [
            f"model: {m['source']} (arch {m['arch']}, {m['backbone']}, pyramid shift {m['pyramid_shift']}) "
            f"at input {height}x{width}",
            f"  {'part':<10}{'GFLOPs':>10}{'params (M)':>12}",
            *[f"  {part:<10}{m['gflops'][part]:>10.2f}{m['params_m'][part]:>12.2f}" for part in m["gflops"]],
            f"  {'total':<10}{m['total_gflops']:>10.2f}{m['total_params_m']:>12.2f}",
        ]
    return "\n".join(lines)
