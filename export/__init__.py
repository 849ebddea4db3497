"""Export of trained detectors to ONNX, TensorRT and other engines; installed as ``msad_deploy.export``."""
