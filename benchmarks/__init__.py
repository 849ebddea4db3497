"""Latency / accuracy benchmarks across input resolutions; installed as ``msad_deploy.benchmarks``."""
