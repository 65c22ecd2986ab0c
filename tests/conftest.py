"""Test-wide settings.

Triton kernels run under the numpy interpreter when there is no GPU: TRITON_INTERPRET must be set
before triton.jit decorates anything, so it is set here, before any test module imports a kernel.
Hypothesis profiles: `ci` (default, bounded examples) and `thorough` (HYPOTHESIS_PROFILE=thorough).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
