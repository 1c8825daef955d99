"""Helpers shared by the model-stage tests: batches in Ray Data's numpy form, the shared COCO
photos, a private placeholder cache, one run of an actor class as a Ray Data actor pool, and a
loopback HTTP server with an OpenAI chat-completion body for client tests."""
from __future__ import annotations

import contextlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO = SHARED / "data" / "captions" / "coco_mini_images"


def coco_images(n: int) -> list[str]:
    """The first ``n`` COCO photos of ../shared (sorted paths)."""
    files = sorted(str(p) for p in COCO.glob("*.jpg"))
    assert len(files) >= n, f"need {n} COCO images in {COCO}"
    return files[:n]


def numpy_batch(rows_: list[dict]) -> dict[str, np.ndarray]:
    """The batch Ray Data's numpy format gives an actor (object arrays, list cells as arrays)."""
    out = {}
    for key in rows_[0]:
        col = np.empty(len(rows_), dtype=object)
        for i, r in enumerate(rows_):
            v = r[key]
            col[i] = np.asarray(v, dtype=object) if isinstance(v, list) else v
        out[key] = col
    return out


def single(batch: dict, i: int) -> dict:
    """Row ``i`` of a batch as a batch of one."""
    return {k: v[i:i + 1] for k, v in batch.items()}


def placeholder_models(tmp_path_factory, label: str, specs: dict[str, dict]):
    """Generator for a fixture: builds the placeholder ``specs`` once into a private
    ``MMSYNTH_CACHE`` and yields ``{name: ResolvedModel dict}``; restores the environment after."""
    from actors.models import materialize, resolve

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp(label)
    mp.setenv("MMSYNTH_CACHE", str(root))
    models = {}
    for name, spec in specs.items():
        resolved = resolve(spec)
        assert resolved.placeholder and resolved.path.startswith(str(root))
        materialize(resolved)
        models[name] = resolved.model_dump()
    yield models
    mp.undo()


def run_ray(ray, actor_cls, model: dict, params: dict, items: list[dict], batch_size: int) -> list[dict]:
    """``items`` through ``actor_cls`` as a Ray Data actor pool of one; rows sorted by id."""
    import ray.data

    env = {"OMP_NUM_THREADS": "1", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}
    if "MMSYNTH_CACHE" in os.environ:
        env["MMSYNTH_CACHE"] = os.environ["MMSYNTH_CACHE"]
    ds = ray.data.from_items(items).map_batches(
        actor_cls, fn_constructor_kwargs={"model": model, "params": params}, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch_size, num_cpus=0.5,
        runtime_env={"env_vars": env})
    return sorted(ds.take_all(), key=lambda r: r["id"])


ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/setup.sh and .ci/run install it)
#: where test artifacts (report screenshots) are kept: $MMSYNTH_TEST_ARTIFACTS or test-artifacts/
ARTIFACTS = Path(os.environ.get("MMSYNTH_TEST_ARTIFACTS") or ROOT / "test-artifacts")


def check_report_in_chromium(page_html: str, manifest: dict, name: str) -> dict:
    """Open a run report in a real headless Chromium (Playwright driving Debian's chromium)
    and check it as a reader would see it: every ``<img>`` (charts and thumbnails) decoded
    with a non-zero size, the funnel chart present, the funnel table's numbers equal to
    ``manifest["funnel"]``, the placeholder banner shown exactly when the manifest names
    placeholder stages. Keeps the page and a full-page screenshot as
    ``ARTIFACTS/<name>.{html,png}``; returns ``{"images": n, "charts": n, "screenshot": path}``.
    """
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: apt-get install chromium (scripts/setup.sh does as root)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page_file, shot = ARTIFACTS / f"{name}.html", ARTIFACTS / f"{name}.png"
    page_file.write_text(page_html, encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.evaluate("""[...document.images].map(i => ({src: i.src.slice(0, 40), alt: i.alt,
                chart: i.classList.contains('chart'), ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0}))""")
            table = page.evaluate("""[...document.querySelectorAll('#funnel tr[data-stage]')].map(tr => ({
                stage: tr.dataset.stage, cells: Object.fromEntries([...tr.querySelectorAll('td[data-key]')]
                    .map(td => [td.dataset.key, td.textContent.trim()]))}))""")
            banner = page.locator("#placeholder-banner").count()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    broken = [i for i in images if not i["ok"]]
    assert not broken, f"images that did not load: {broken}"
    assert any(i["chart"] and i["alt"] == "funnel chart" for i in images)
    assert [r["stage"] for r in table] == [f"{f['phase']}: {f['stage']}" if f.get("phase") else f["stage"]
                                           for f in manifest["funnel"]]
    for row, f in zip(table, manifest["funnel"]):
        for key, text in row["cells"].items():
            assert text == ("" if f.get(key) is None else str(f[key])), (row["stage"], key, text, f.get(key))
    assert banner == (1 if manifest["placeholder_stages"] or manifest["audit_stages"] else 0)
    return {"images": len(images), "charts": sum(i["chart"] for i in images), "screenshot": str(shot)}


def clients_csv(path, rows) -> str:
    """Write MIRROR-LLaVA test-client rows as the original's test CSV; returns its path."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def client_record(idx, img, gender="Man") -> dict:
    """One client row of the original's test CSV (``img_path`` = ``img``)."""
    return {"idx": idx, "personal_info": "Name: Sam\nAge: 41", "personality": "Doubts that therapy can help.",
            "distorted_thought": "If I slip once, everyone will see I am a fraud.",
            "reason_for_seeking_counseling": "I cannot sleep before meetings.", "img_path": img,
            "dominant_gender": gender}


def tiny_lora_checkpoint(folder: str) -> str:
    """A mirror-llava-train checkpoint folder without training: the tiny LLaVA placeholder with
    a fresh LoRA adapter (``actors.vlm_lora`` save format: adapter, processor, base.json)."""
    import shutil

    import torch

    from actors import vlm_lora as VL

    cfg = VL.profile_config("offline", base="placeholder:tiny-llava")
    model, processor, resolved = VL._load_base(cfg, torch.device("cpu"), torch.float32)
    tmp = VL._save(VL.apply_lora(model, cfg), processor, cfg, resolved, {"global_step": 0}, [], {})
    shutil.move(tmp, folder)
    return folder


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 (random port) for tests of HTTP clients.

    Every POST is recorded in ``requests`` as ``{"path", "query" (dict of lists), "headers"
    (lower-cased names), "body" (parsed JSON)}`` and answered by ``respond(request) ->
    (status, payload dict, extra headers dict)``. ``url`` is ``http://127.0.0.1:<port>``.
    Use as a context manager or call ``close()``.
    """

    def __init__(self, respond):
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                try:
                    raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    parts = urlsplit(self.path)
                    req = {"path": parts.path, "query": parse_qs(parts.query),
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": json.loads(raw) if raw else None}
                    with srv.lock:
                        srv.requests.append(req)
                    status, payload, headers = respond(req)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chat_completion(model: str, content: str, prompt_tokens: int = 10, completion_tokens: int = 5) -> dict:
    """An OpenAI chat-completions response body with one assistant message ``content``."""
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class NeverAnswers:
    """A Serve deployment class whose every call waits an hour: a backend that never answers
    (the timeout tests of the MIRROR-LLaVA app and its sessions)."""

    async def _hang(self, *args, **kwargs):
        import asyncio

        await asyncio.sleep(3600)

    generate = verify = client = describe = counselor = _hang

    def ping(self) -> str:
        return "ok"


#: Antidote-like rows over four COCO photos of ../shared (caption ids of data/captions/
#: coco2017_mini.jsonl): (row id, photo, rewritten caption, a present object, an absent object,
#: a question about the absent object (CPQ), one about the present object (TPQ))
ANTIDOTE_ROWS = (
    ("coco2017-cap-576009", "train2017_000000000790.jpg", "A family sits at a table with a birthday cake.",
     "cake", "dog", "What color is the dog lying under the table?", "What kind of cake is on the table?"),
    ("coco2017-cap-151177", "train2017_000000107438.jpg", "A bike parked under a traffic light next to a sign.",
     "bike", "horse", "What is the horse next to the sign eating?", "What color is the bike by the sign?"),
    ("coco2017-cap-358298", "train2017_000000121647.jpg", "Pizza on a plate next to a wine glass and a book.",
     "pizza", "cat", "What is the cat beside the plate looking at?", "What toppings are on the pizza?"),
    ("coco2017-cap-255392", "train2017_000000129648.jpg", "A boy in a white t-shirt does a skateboarding trick.",
     "skateboard", "helmet", "What color is the boy's helmet?", "What trick is the boy doing on the skateboard?"),
)


def antidote_output(root, n: int = 4, size: int = 96, copies: int = 1) -> str:
    """A folder shaped like ``jobs.antidote``'s export for the first ``n`` ``ANTIDOTE_ROWS``:
    ``queries/{cpq,tpq,pope,desc}_list.jsonl`` (records from ``udfs.antidote.query_record`` with
    the original's hints: ``cpq_hint``, ``tpq_hint``, ``pope_hint``, ``desc_queries``) and
    ``images/<id>.png`` (the real COCO photos, downscaled to ``size`` px). ``copies`` > 1 repeats
    each row under the ids ``<id>-<k>`` (larger inputs for benchmarks). Returns its path."""
    from PIL import Image

    from udfs import antidote as A

    root = str(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    queries = {t: [] for t in ("cpq", "tpq", "pope", "desc")}
    rows_ = [(rid if copies == 1 else f"{rid}-{k}", *rest) for rid, *rest in ANTIDOTE_ROWS[:n] for k in range(copies)]
    for rid, photo, caption, present, absent, cpq, tpq in rows_:
        img = Image.open(COCO / photo).convert("RGB")
        img.thumbnail((size, size))
        img.save(os.path.join(root, A.image_rel_path(rid)))
        pope = A.pope_template(present)
        desc = A.desc_queries({"id": [rid], "caption_rewritten": [caption], "present_final": [[present]],
                               "no_exist_final": [[absent]]}, None)
        queries["cpq"].append(A.query_record(rid, cpq, A.cpq_hint(absent, cpq)))
        queries["tpq"].append(A.query_record(rid, tpq, A.tpq_hint(present, tpq)))
        queries["pope"].append(A.query_record(rid, pope, A.pope_hint(present, pope)))
        queries["desc"].append(A.query_record(rid, desc["desc_text"][0], desc["desc_hint"][0]))
    os.makedirs(os.path.join(root, "queries"), exist_ok=True)
    for t, recs in queries.items():
        with open(os.path.join(root, "queries", f"{t}_list.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in sorted(recs, key=lambda r: r["id"]))
    return root


@contextlib.contextmanager
def moto_s3(monkeypatch, *buckets: str):
    """A real S3 API (moto's server on 127.0.0.1, random port) with ``buckets`` created; the
    ``AWS_*`` variables point at it (through ``monkeypatch``) and ``udfs.io``'s S3 filesystem
    cache is cleared. Yields those variables (for subprocesses). Stops the server on exit."""
    from moto.server import ThreadedMotoServer

    from udfs import io

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-west-2",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-west-2")
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
        io._s3.cache_clear()
        yield env
    finally:
        srv.stop()
