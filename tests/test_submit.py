"""`python -m jobs submit` against a real Ray head started by the test (its own process group).

Never `ray stop` here: it would stop every Ray process on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    # every port of its own: the session's other Ray cluster holds the defaults (the dashboard
    # agent's 52365 among them, and without an agent no job can be submitted)
    port, dash, agent_http, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}",
                             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                             "--disable-usage-stats", "--include-dashboard=true"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("Ray head did not start")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # `ray start --block` drains for ~40 s on SIGTERM (shared/notes/scale.md): do not wait it out
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_same_command_as_a_ray_job(ray_head, tmp_path):
    url, env = ray_head
    res = subprocess.run([sys.executable, "-m", "jobs", "submit", "antidote", "--address", url,
                          "--input", "data/captions/coco2017_mini.jsonl", "--output", str(tmp_path / "o"),
                          "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "submitted raysubmit_" in res.stdout
    assert "placeholder models (outputs marked, filters in audit mode)" in res.stdout  # the job's own log
    assert "SUCCEEDED" in res.stdout
