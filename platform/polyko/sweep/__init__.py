"""Sweeps that decide how to train the big models: Ray Tune over real Ray Train runs (``tune``), search
spaces over ``PretrainConfig`` (``space``), and the scaling-law ladder (``ladder``)."""

from polyko.config import load_config_file
from polyko.sweep.space import Dimension, apply_values, parse_search
from polyko.sweep.tune import SchedulerConfig, SweepConfig, SweepResult, TrialSummary, default_config, \
    load_sweep_file, sweep

__all__ = ["Dimension", "SchedulerConfig", "SweepConfig", "SweepResult", "TrialSummary", "apply_values",
           "default_config", "load_config_file", "load_sweep_file", "parse_search", "sweep"]
