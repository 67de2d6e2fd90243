"""`ace serve`: a registered model behind MLflow's own scoring app, with a guard in front.

MLflow's scoring app (what `mlflow models serve` runs: POST /invocations, GET /ping, /health,
/version) answers every request; the guard in front of /invocations makes sure nothing a client
can send ends in a 5xx or shows a stack trace:

- a request without a Content-Type gets 415 (MLflow's app fails on it with a 500), one without a
  body 400;
- a body over the model's `max_request_bytes` gets 413 before more of it is read;
- every error body is one JSON object `{"error_code", "message"}` with a one-line message: no
  `stack_trace`, and MLflow's wrapping of the model's own message ("Failed to predict data
  '<the whole request>'. Error: ...") cut back to that message;
- anything unexpected is logged with its trace and answered 500 with a line that holds none.

The model's other limits (rows per request, k, query length) are checked by the model itself
(components/serving/serving.py), so they hold under `mlflow models serve` too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from components.config import ServingLimits

MODEL_URI_ENV = "ACE_SERVE_MODEL_URI"  # how uvicorn's worker processes learn what to load

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_PARAMETER_VALUE",
    500: "INTERNAL_ERROR",
    504: "DEADLINE_EXCEEDED",
}
MAX_MESSAGE_CHARS = 1000
_LIMIT = "serving.limits.max_request_bytes"
_logger = logging.getLogger(__name__)


def error_body(status: int, message: str, error_code: str | None = None) -> bytes:
    return json.dumps(
        {"error_code": error_code or ERROR_CODES.get(status, "ERROR"), "message": message}
    ).encode()


def one_line(status: int, body: bytes) -> bytes:
    """An error response's body as `{"error_code", "message"}`, the message one line, no trace."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        payload = {"message": body.decode("utf-8", "replace")}
    message = str(payload.get("message", ""))
    # MLflow wraps the model's message as "Failed to predict data '<the request>'. \nError: ...".
    message = message.rsplit("\nError: ", 1)[-1]
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    message = (lines[0] if lines else f"HTTP {status}")[:MAX_MESSAGE_CHARS]
    code = payload.get("error_code")
    return error_body(status, message, code if isinstance(code, str) else None)


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _reply(send: Send, status: int, message: str) -> None:
    await _respond(send, status, error_body(status, message))


class RequestGuard:
    """ASGI middleware in front of the scoring app's /invocations (see the module doc)."""

    def __init__(self, app: App, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/invocations" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._invocation(scope, receive, tracked)
        except Exception:
            _logger.exception("unexpected failure answering %s", scope["path"])
            if not started:
                await _reply(send, 500, "internal error; the server log has the details")

    async def _invocation(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name.lower(): value for name, value in scope["headers"]}
        limit = self.max_request_bytes
        if not headers.get(b"content-type", b"").strip():
            await _reply(
                send,
                415,
                "no Content-Type: send application/json (or application/vnd.apache.parquet)",
            )
            return
        declared = headers.get(b"content-length", b"").strip()
        if declared and (not declared.isdigit() or int(declared) > limit):
            await _reply(send, 413, f"a request body may have at most {limit} bytes ({_LIMIT})")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _reply(send, 413, f"a request body may have at most {limit} bytes ({_LIMIT})")
                return
            if not message.get("more_body", False):
                break
        if not body.strip():
            await _reply(send, 400, 'empty request body: send {"dataframe_records": [...]}')
            return

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, _ErrorCleaner(send).send)


class _ErrorCleaner:
    """Passes a success through as it streams; buffers an error response to rewrite its body."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._status = 200
        self._chunks: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = int(message["status"])
            if self._status < 400:
                await self._send(message)
            return
        if message["type"] != "http.response.body" or self._status < 400:
            await self._send(message)
            return
        self._chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        await _respond(self._send, self._status, one_line(self._status, b"".join(self._chunks)))


def create_app() -> App:
    """The guarded scoring app of the model named by $ACE_SERVE_MODEL_URI (uvicorn's factory)."""
    from mlflow.pyfunc import load_model, scoring_server

    model = load_model(os.environ[MODEL_URI_ENV])
    limits = getattr(model.unwrap_python_model(), "limits", None) or ServingLimits()
    return RequestGuard(scoring_server.init(model), limits.max_request_bytes)


def serve(model_uri: str, host: str, port: int, workers: int) -> None:
    """Run uvicorn with `workers` processes, each loading the model and guarding it."""
    import uvicorn

    os.environ[MODEL_URI_ENV] = model_uri
    uvicorn.run(
        "components.serving.server:create_app", factory=True, host=host, port=port, workers=workers
    )
