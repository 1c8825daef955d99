"""The GPU stage-timing script (benchmarks/gpu_stages.py) in its dry mode, and its JSON read by the
scaling benchmark. The real run needs the device tool's GPU; here the same code runs on tiny
configs on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_times_every_stage_and_scale_reads_it(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_stages.py", "--device", "cpu", "--tiny", "--repeat", "1",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["latency"]) == {"stabilityai/stable-diffusion-3-medium-diffusers", "SG161222/RealVisXL_V3.0",
                                   "IDEA-Research/grounding-dino-base", "openai/clip-vit-large-patch14",
                                   "llava-hf/llava-1.5-7b-hf"}
    for model, m in doc["latency"].items():
        assert m["kind"] == "gpu" and m["tiny"] and "error" not in m, model
        assert m["fixed_s"] >= 0 and m["per_row_s"] >= 0 and len(m["batch_s"]) == 2
        assert all(v > 0 for v in m["batch_s"].values()) and m["basis"].startswith("measured: CPU")
        assert m["source"].startswith("benchmarks/gpu_stages.py")
    assert "64 MiB" in doc["vllm"] and doc["machine"]["gpu"] is None

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import scale

    assert scale.load_latency(str(out)) == {}  # tiny dry-run figures never replace real ones
    for m in doc["latency"].values():
        m["tiny"] = False
    out.write_text(json.dumps(doc))
    loaded = scale.load_latency(str(out))
    assert set(loaded) == set(doc["latency"])
    sdxl = dict(loaded["SG161222/RealVisXL_V3.0"])
    assert scale.batch_seconds(sdxl, 2) == sdxl["fixed_s"] + 2 * sdxl["per_row_s"]
