"""Training recipes for MSAD (baseline, aligned teacher, distilled student); installed as ``msad_deploy.training``."""
