"""ASGI middleware of the MIRROR-LLaVA Serve application: the request body limit (413)."""
from __future__ import annotations

import json


class BodyLimitMiddleware:
    """Pure ASGI middleware: answer 413 for a request body over ``max_bytes``.

    Checks ``Content-Length`` first, then reads the body (chunked or not) up to the limit,
    answering 413 itself as soon as it is exceeded; otherwise the buffered body is replayed to
    the app as one message. (Raising from a wrapped ``receive()`` becomes a 400 "Invalid
    multipart data" in FastAPI: notes/faces-train-serve.md §2.)
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    if int(v) > self.max_bytes:
                        return await self._reject(send)
                except ValueError:
                    pass
        chunks, total, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body = msg.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                return await self._reject(send)
            chunks.append(body)
            more = msg.get("more_body", False)
        data, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
