"""Shared test settings: a hypothesis profile sized for a 2-core CI machine."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FC2CONV_HYPOTHESIS_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
