"""What every benchmark does first (``import bench_env`` before any import of ours): put the
repository and this folder on ``sys.path`` and set the offline, quiet defaults the jobs use
(values already in the environment win). ``machine()`` describes the hardware and versions a
results file records. Benchmarks run as scripts: ``python benchmarks/<name>.py``.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

#: environment defaults: no model hub, local Ray without token auth, OpenMP threads that sleep
#: instead of spinning (busy-waiting threads collapse on shared cores), Keras on torch, no
#: tokenizer thread pools, no Ray Data progress bars in the results' logs
DEFAULTS = {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "OMP_WAIT_POLICY": "PASSIVE",
            "TOKENIZERS_PARALLELISM": "false", "KERAS_BACKEND": "torch", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
        "python": platform.python_version(), "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }
    for mod in ("ray", "diffusers", "transformers", "open_clip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[mod] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]  # other work on the box skews figures
    except OSError:
        pass
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    return info
