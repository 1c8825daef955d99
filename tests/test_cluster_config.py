"""cluster.yaml passes Ray's own autoscaler config validation, names a current host image for
every node type, and the fake autoscaling cluster of tests/fake_cluster.py derives from it (no network)."""
from __future__ import annotations

import copy
import os
import re

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


def _images(cfg) -> dict:
    return {n: t["node_config"].get("ImageId") for n, t in cfg["available_node_types"].items()}


def test_no_node_type_falls_back_to_rays_default_ami():
    """Ray's own AMI defaulting (``_check_ami``, offline) leaves every node type's ImageId as
    written: none is empty or ``latest_dlami``, which resolve to Ray's Ubuntu 18.04 DLAMI V71
    (CUDA 11.2 driver, too old for the CUDA 12 container)."""
    from ray.autoscaler._private.aws import config as aws

    prepared = _validate(_load())
    before = _images(prepared)
    aws._check_ami(prepared)
    assert _images(prepared) == before
    for name, image in before.items():
        assert image not in aws.DEFAULT_AMI.values(), name
        assert re.fullmatch(r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/[\w.-]+/[\w.-]+/ami-id"
                            r"|ami-[0-9a-f]{8,17}", image), (name, image)


@pytest.mark.parametrize("image", [None, "latest_dlami"])
def test_ami_check_catches_a_node_type_without_an_image(image):
    from ray.autoscaler._private.aws import config as aws

    prepared = _validate(_load())
    node_config = prepared["available_node_types"]["gpu_l4"]["node_config"]
    node_config.pop("ImageId")
    if image:
        node_config["ImageId"] = image
    aws._check_ami(prepared)
    assert node_config["ImageId"] == aws.DEFAULT_AMI[prepared["provider"]["region"]]


def test_fake_cluster_config_derives_every_worker_type():
    """tests/fake_cluster.py turns every worker type of cluster.yaml into a fake type with the
    same GPU count and accelerator resources, scales from 0, and writes every top-level key
    autoscaler v1 reads (it reads the fake yaml verbatim, no defaults merged)."""
    from ray.autoscaler._private.util import validate_config

    from tests.fake_cluster import HEAD_TYPE, fake_config

    cluster = _load()
    cluster["available_node_types"]["gpu_a10g"] = {  # a type added later is derived too
        "min_workers": 1, "max_workers": 2, "resources": {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1},
        "node_config": {"InstanceType": "g5.2xlarge"}}
    fake = fake_config(cluster, "127.0.0.1:6390")
    validate_config(fake)
    assert set(fake) >= set(_validate(_load())), "a top-level key the launcher defaults is missing"
    head = cluster["head_node_type"]
    workers = {n: t for n, t in cluster["available_node_types"].items() if n != head}
    assert set(fake["available_node_types"]) == set(workers) | {HEAD_TYPE}
    assert fake["available_node_types"][HEAD_TYPE]["resources"] == {
        "CPU": cluster["available_node_types"][head]["resources"]["CPU"], "GPU": 0}
    for name, real in workers.items():
        f = fake["available_node_types"][name]
        accel = lambda r: {k: v for k, v in r.items() if k.startswith("accelerator_type:")}  # noqa: E731
        assert f["resources"].get("GPU", 0) == real["resources"].get("GPU", 0), name
        assert accel(f["resources"]) == accel(real["resources"]), name
        assert 1 <= f["resources"]["CPU"] <= real["resources"]["CPU"], name
        assert f["min_workers"] == 0 and 1 <= f["max_workers"] <= real["max_workers"], name
    assert fake["provider"] == {**fake["provider"], "type": "fake_multinode", "launch_multiple": True,
                                "gcs_address": "127.0.0.1:6390"}
    assert fake["max_workers"] == sum(t.get("max_workers", 0) for t in fake["available_node_types"].values())
