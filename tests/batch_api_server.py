"""A fake OpenAI Files + Batch API on loopback, for the ``--batch`` round-trip tests (not shipped).

It answers the ``openai`` client's real calls: ``POST /v1/files`` (multipart upload; the JSONL
is stored), ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/files/{id}/content``. A
batch stays ``in_progress`` until the test calls ``finish``, which runs each request through a
chat ``respond(request line) -> (status, body)`` function the way the provider would and writes
the output and error files.
"""
from __future__ import annotations

import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class FakeBatchAPI:
    """The server; ``url`` is ``http://127.0.0.1:<port>`` (clients use ``url + "/v1"``).

    ``files``: file id -> bytes; ``batches``: batch id -> the batch object (a dict, as the API
    returns it) plus ``"_lines"`` (its request lines); ``calls``: ``(method, path)`` of every
    request. Use as a context manager."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, status: int, payload, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with srv.lock:
                    srv.calls.append(("POST", self.path))
                    if self.path == "/v1/files":
                        return self._reply(200, srv._upload(self.headers.get("Content-Type"), raw))
                    if self.path == "/v1/batches":
                        return self._reply(200, srv._create(json.loads(raw)))
                self._reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                with srv.lock:
                    srv.calls.append(("GET", self.path))
                    parts = self.path.strip("/").split("/")
                    if parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in srv.batches:
                        return self._reply(200, srv._public(srv.batches[parts[2]]))
                    if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content" \
                            and parts[2] in srv.files:
                        return self._reply(200, None, srv.files[parts[2]])
                self._reply(404, {"error": {"message": f"no route {self.path}"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    # -------------------------------------------------------------- API

    def _upload(self, content_type: str, raw: bytes) -> dict:
        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        data, purpose, name = None, None, None
        for part in msg.iter_parts():
            field = part.get_param("name", header="content-disposition")
            if field == "file":
                data, name = part.get_payload(decode=True), part.get_filename()
            elif field == "purpose":
                purpose = part.get_content().strip()
        assert data is not None and purpose == "batch", (purpose, data is None)
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = data
        return {"id": fid, "object": "file", "bytes": len(data), "created_at": 0, "filename": name,
                "purpose": purpose, "status": "processed"}

    def _create(self, req: dict) -> dict:
        assert req["endpoint"] == "/v1/chat/completions" and req["completion_window"] == "24h", req
        lines = [json.loads(x) for x in self.files[req["input_file_id"]].decode().splitlines() if x.strip()]
        bid = f"batch_{len(self.batches) + 1}"
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None,
                             "input_file_id": req["input_file_id"], "completion_window": "24h",
                             "status": "in_progress", "output_file_id": None, "error_file_id": None,
                             "created_at": 0, "metadata": req.get("metadata"),
                             "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "_lines": lines}
        return self._public(self.batches[bid])

    @staticmethod
    def _public(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    # -------------------------------------------------------------- test controls

    def requests_per_batch(self) -> list[int]:
        """The number of request lines of each batch, in creation order."""
        return [len(b["_lines"]) for b in self.batches.values()]

    def lines(self, batch_id: str) -> list[dict]:
        """The request lines of a batch."""
        return self.batches[batch_id]["_lines"]

    def finish(self, batch_id: str, respond: Callable[[dict], tuple[int, dict]], status: str = "completed",
               error_line: Callable[[dict], str | None] = lambda line: None,
               drop: Callable[[dict], bool] = lambda line: False) -> None:
        """Run the batch: every request line not ``drop``-ped gets an output line from
        ``respond(line) -> (HTTP status, body)`` (non-200 ones go to the error file, as OpenAI
        does), or, when ``error_line(line)`` returns a message, an error-file line with that
        message. Sets ``status`` and the request counts."""
        out, err = [], []
        with self.lock:
            b = self.batches[batch_id]
            for n, line in enumerate(b["_lines"]):
                if drop(line):
                    continue
                rid = f"batch_req_{batch_id}_{n}"
                msg = error_line(line)
                if msg is not None:
                    err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                                "error": {"code": "server_error", "message": msg}})
                    continue
                code, body = respond(line)
                rec = {"id": rid, "custom_id": line["custom_id"], "error": None,
                       "response": {"status_code": code, "request_id": f"req_{n}", "body": body}}
                (out if code == 200 else err).append(rec)
            for name, recs in (("output_file_id", out), ("error_file_id", err)):
                if recs:
                    fid = f"file-{len(self.files) + 1}"
                    self.files[fid] = "".join(json.dumps(r) + "\n" for r in recs).encode()
                    b[name] = fid
            b["status"] = status
            b["request_counts"] = {"total": len(b["_lines"]), "completed": len(out), "failed": len(err)}

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
