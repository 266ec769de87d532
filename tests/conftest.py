"""Shared pytest configuration: hypothesis profiles and the storage test servers.

Profiles: ``default`` (fast, for the edit-test loop) and ``ci`` (more examples), chosen with
``HYPOTHESIS_PROFILE=ci``.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

pytest.register_assert_rewrite("conftest_servers")
try:  # fixtures for the remote-storage tests (moto, nginx, fault proxy), when present
    from conftest_servers import *  # noqa: F401,F403
except ImportError:
    pass
