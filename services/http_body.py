"""A request body as bounded UTF-8 JSON: Content-Type, the size limit (declared and actually sent,
chunked uploads too), encoding and syntax, each refused with a 4xx APIError naming body or the header."""

import json

from starlette.requests import ClientDisconnect, Request

from services.http_errors import APIError


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
    try:
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise APIError(413, "body_too_large", f"body: more than the {limit}-byte limit was sent", "body")
            parts.append(part)
    except ClientDisconnect:
        raise APIError(400, "client_disconnected", "the client went away while sending the body", "body") from None
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
