"""Inference runtime for services: load an artifact, preprocess, run a backend, postprocess."""
