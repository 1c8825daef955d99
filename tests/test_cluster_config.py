"""cluster.yaml passes Ray's own autoscaler config validation (no network)."""
from __future__ import annotations

import copy
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid():
    prepared = _validate(_load())
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) >= 2 and all(t["min_workers"] == 0 for t in gpu)
    assert any(not t["resources"].get("GPU") and t["resources"].get("CPU") for n, t in types.items()
               if n != prepared["head_node_type"])
    for t in gpu:  # GPU nodes install the project with its GPU extra
        assert any("[gpu]" in c for c in t["worker_setup_commands"])
    assert prepared["file_mounts"] == {"~/mmsynth": "."}


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_l4"].update(min_worker=0),
    lambda c: c["available_node_types"]["gpu_l4"]["resources"].update(GPU=0.5),
    lambda c: c.update(head_node_type="nope"),
    lambda c: c.update(idle_timeout_minutes=-1),
])
def test_validation_catches_mistakes(mutate):
    cfg = _load()
    mutate(cfg)
    with pytest.raises(Exception):
        _validate(cfg)
