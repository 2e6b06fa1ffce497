"""Thin entry points, each runnable as ``accelerate launch -m pipelines.NAME`` and through the
``swintormer`` console script. Orchestration only: the maths lives in ``swintormer`` and
``ldm_prior``."""
