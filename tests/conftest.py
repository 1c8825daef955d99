"""Shared fixtures: one private local Ray cluster per test session (2 CPUs, no dashboard)."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP busy-waiting makes small torch models 10-100x slower on a shared 2-core box
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


@pytest.fixture(scope="session")
def ray_local():
    """A private Ray cluster (``address='local'`` never attaches to another cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                                           "TOKENIZERS_PARALLELISM": "false",
                                           "OMP_WAIT_POLICY": "PASSIVE"}},
                 log_to_driver=False)
    yield ray
