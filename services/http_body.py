"""A request body as bounded UTF-8 JSON: Content-Type, the size limit (declared and actually sent,
chunked uploads too), encoding and syntax, each refused with a 4xx APIError naming body or the header.

Why the rest of a body is drained before an error on a closing connection (`finish_body`): Serve's
proxy (uvicorn) reads and drops the unread rest of a request after its answer on a keep-alive
connection, so there an error (a 413, a 401 before the body) can go out at once. When the connection
closes after the answer (`Connection: close`, which Python's urllib sends, or HTTP/1.0), uvicorn
closes the socket right after it while the client may still be sending; the unread bytes make the
kernel send a TCP reset, and the client sees "connection reset" instead of the error. Reading the rest
first (bounded by DRAIN_MAX_BYTES and DRAIN_IDLE_S) lets the socket close cleanly. The replica pulls
the whole body from the proxy anyway, so draining adds no transfer. docs/serving.md "Oversized bodies"."""

import asyncio
import json

from starlette.requests import Request

from services.http_errors import APIError

DRAIN_MAX_BYTES = 64 * 1024 * 1024  # a longer body on a closing connection is cut (the client may see a reset)
DRAIN_IDLE_S = 1.0  # a client that declared a body but sends nothing gets its error after this


async def read_json_body(request: Request, limit: int):
    ctype = request.headers.get("content-type")
    media, _, params = (ctype or "").partition(";")
    charset = params.strip().lower().replace(" ", "")
    if media.strip().lower() != "application/json" or charset not in ("", "charset=utf-8"):
        raise APIError(415, "unsupported_media_type", f"Content-Type must be application/json (UTF-8); got {ctype!r}",
                       "headers.content-type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:  # uvicorn refuses malformed ones
        raise APIError(413, "body_too_large", f"body: {length} bytes exceeds the {limit}-byte limit", "body")
    parts, size = [], 0
    async for part in _body_parts(request):
        size += len(part)
        if size > limit:
            raise APIError(413, "body_too_large", f"body: more than the {limit}-byte limit was sent", "body")
        parts.append(part)
    raw = b"".join(parts)
    if not raw:
        raise APIError(400, "invalid_json", "body: empty; a JSON object is required", "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, "invalid_encoding", f"body: not valid UTF-8 (byte {e.start})", "body") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise APIError(400, "invalid_json", f"body: not valid JSON ({str(e)[:200]})", "body") from None


async def finish_body(request: Request) -> None:
    """Before an error answer: on a connection that closes after it, read and drop the body's unread rest."""
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    closes = "close" in tokens or request.scope.get("http_version") == "1.0"  # uvicorn keeps no HTTP/1.0 alive
    length = request.headers.get("content-length", "")
    if not closes or _progress(request)["done"] or (length.isdigit() and int(length) > DRAIN_MAX_BYTES):
        return
    async for _ in _body_parts(request, DRAIN_IDLE_S):
        if _progress(request)["bytes"] > DRAIN_MAX_BYTES:
            return


def _progress(request: Request) -> dict:
    """How much of the body this request has received, shared by every Request object of the scope."""
    return request.scope.setdefault("vla_grpo.body", {"bytes": 0, "done": False})


async def _body_parts(request: Request, idle_s: float | None = None):
    """The body's chunks from ASGI receive (Starlette's stream() cannot be resumed by the drain);
    with idle_s it ends quietly, also on a disconnect, when nothing arrives for that long."""
    progress = _progress(request)
    while not progress["done"]:
        try:
            message = await (asyncio.wait_for(request.receive(), idle_s) if idle_s else request.receive())
        except asyncio.TimeoutError:
            return
        if message["type"] == "http.disconnect":
            progress["done"] = True
            if idle_s:
                return
            raise APIError(400, "client_disconnected", "the client went away while sending the body", "body")
        progress["bytes"] += len(message.get("body", b""))
        progress["done"] = not message.get("more_body", False)
        yield message.get("body", b"")
