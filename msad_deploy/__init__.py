"""msad-deploy: Multi-Scale Aligned Distillation for fast low-resolution object detection."""

__version__ = "0.1.0"
