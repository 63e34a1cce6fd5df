"""The public HTTP policy API for real robots: a Ray Serve app with a FastAPI ingress.

    POST /v1/act    image (PNG | JPEG | raw uint8) + instruction [+ proprio] -> one action chunk
    GET  /v1/info   model facts, limits and batching counters          (Bearer token)
    GET  /healthz   liveness                                            (no auth)

Concurrent requests share one forward pass (`@serve.batch`). Actions are un-normalised env actions, with
no environment-specific post-processing (e.g. LIBERO's gripper flip).
Every client mistake is a 4xx JSON error {"error": {"status", "code", "message", "field"}}.
Contract: docs/serving.md. RayService import path: `services.http_api:app_builder`.
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import os
import re
import time
import zlib
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from common.config import PolicyConfig
from common.records import ActionChunk, Observation

logger = logging.getLogger(__name__)

APP_NAME = "vla-http-api"
TOKEN_ENV = "VLA_API_TOKEN"
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_IMAGE_SIDE = 1024
MIN_IMAGE_SIDE = 16
MAX_INSTRUCTION_CHARS = 512
MAX_PROMPT_TOKENS = 600
MAX_PROPRIO_DIMS = 64
MAX_TEMPERATURE = 5.0
TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]{16,512}=*")
REALM = 'Bearer realm="vla-grpo"'

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageIn(_Strict):
    format: Literal["png", "jpeg", "raw"]
    data: str = Field(min_length=1, description="standard base64 (RFC 4648), no line breaks")
    shape: list[int] | None = Field(None, min_length=3, max_length=3, description="[H, W, 3]; raw only")

    @model_validator(mode="after")
    def _shape_only_for_raw(self):
        if self.format == "raw" and self.shape is None:
            raise ValueError("shape [H, W, 3] is required for raw images")
        if self.format != "raw" and self.shape is not None:
            raise ValueError(f"shape is only for raw images ({self.format} data carries its own size)")
        return self


class ActRequest(_Strict):
    image: ImageIn
    instruction: str = Field(min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    proprio: list[Finite] | None = Field(None, max_length=MAX_PROPRIO_DIMS)
    greedy: bool = True
    temperature: Annotated[float, Field(gt=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] | None = None

    @field_validator("instruction")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class HTTPApiArgs(BaseModel):
    """Arguments of `app_builder` (the `args:` of a Serve config / RayService application)."""

    model_config = ConfigDict(extra="forbid")
    policy_path: str
    token_file: str | None = None
    auth: bool = True
    unnorm_key: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    policy: PolicyConfig | None = None  # the run's: what official folders do not record (chunk, center_crop)
    max_batch_size: int = Field(16, gt=0, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=1)
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024, le=64 * 1024 * 1024)
    max_image_side: int = Field(MAX_IMAGE_SIDE, ge=MIN_IMAGE_SIDE, le=4096)
    model_version: int = Field(0, ge=0)
    num_replicas: int = Field(1, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    torch_threads: int | None = Field(None, gt=0)
    seed: int = 0


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 details: list | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.details, self.headers = (
            status, code, message, field, details, headers)

    def response(self) -> JSONResponse:
        err = {"status": self.status, "code": self.code, "message": self.message, "field": self.field}
        if self.details:
            err["details"] = self.details
        return JSONResponse({"error": err}, status_code=self.status, headers=self.headers)


def _validation_error(exc: ValidationError) -> APIError:
    details = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        field = ".".join(str(p) for p in e["loc"]) or "body"
        details.append({"field": field, "message": e["msg"].removeprefix("Value error, ")})
    first = details[0]
    more = f" (+{len(details) - 1} more)" if len(details) > 1 else ""
    return APIError(422, "invalid_request", f"{first['field']}: {first['message']}{more}", first["field"], details)


def _check_side(h: int, w: int, max_side: int, field: str) -> None:
    if not (MIN_IMAGE_SIDE <= h <= max_side and MIN_IMAGE_SIDE <= w <= max_side):
        raise _bad_image(f"image is {h}x{w} (HxW); each side must be {MIN_IMAGE_SIDE}..{max_side} pixels", field,
                         "image_too_large" if max(h, w) > max_side else "image_too_small")


def _unauthorized(code: str, message: str, error: str | None = None) -> APIError:
    www = REALM + (f', error="{error}"' if error else "")
    return APIError(401, code, message, "headers.authorization", headers={"WWW-Authenticate": www})


def _bad_image(message: str, field: str = "image.data", code: str = "invalid_image") -> APIError:
    return APIError(422, code, f"{field}: {message}", field)


def decode_image(img: ImageIn, max_side: int) -> np.ndarray:
    """Base64 PNG/JPEG/raw -> [H, W, 3] uint8, with size and channel checks before pixel decoding."""
    try:
        data = base64.b64decode(img.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad_image(f"not valid base64 ({e})", code="invalid_base64") from None
    if img.format == "raw":
        h, w, c = img.shape
        _check_side(h, w, max_side, "image.shape")
        if c != 3:
            raise _bad_image(f"{c} channels; 3 (RGB) are required", "image.shape")
        if len(data) != h * w * 3:
            raise _bad_image(f"{len(data)} bytes do not match shape {img.shape} ({h * w * 3} uint8 bytes expected)")
        return np.frombuffer(data, np.uint8).reshape(h, w, 3)
    from PIL import Image, UnidentifiedImageError

    fmt = {"png": "PNG", "jpeg": "JPEG"}[img.format]
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            w, h = im.size  # from the header: a decompression bomb is refused before decoding
            _check_side(h, w, max_side, "image.data")
            if im.mode != "RGB":
                raise _bad_image(f"a 3-channel 8-bit RGB image is required, got mode {im.mode!r} "
                                 f"({len(im.getbands())} channel(s))")
            im.load()
            return np.asarray(im, dtype=np.uint8).copy()
    except APIError:
        raise
    except UnidentifiedImageError:
        raise _bad_image(f"not a {fmt} image") from None
    except Exception as e:  # truncated or corrupt data: the client's bytes, never a server fault
        raise _bad_image(f"corrupt {fmt} image ({type(e).__name__}: {e})") from None


def resolve_token(token: str | None = None, token_file: str | None = None, auth: bool = True) -> str | None:
    """The API token (explicit > token_file > $VLA_API_TOKEN); None only when auth is off."""
    if not auth:
        return None
    if token is None and token_file:
        try:
            token = Path(token_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API token file {token_file!r}: {e}") from None
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token or not token.strip():
        raise ValueError(f"auth is on but no API token is configured: pass token_file=FILE, set ${TOKEN_ENV}, or "
                         "explicitly pass auth=False (trusted networks only)")
    token = token.strip()
    if not TOKEN_RE.fullmatch(token):
        raise ValueError("the API token must be 16-512 characters of A-Z a-z 0-9 - . _ ~ + / (e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


app = FastAPI(title="vla-grpo policy API", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return APIError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}", "path",
                    headers=getattr(exc, "headers", None)).response()


@serve.deployment(name="PolicyHTTP", max_ongoing_requests=64, max_queued_requests=512, max_constructor_retry_count=3)
@serve.ingress(app)
class PolicyHTTPDeployment:
    def __init__(self, policy_path: str, token_sha256: str | None, args: dict):
        import torch
        from policy.checkpoint import load_policy  # noqa: I001 (heavy imports stay in the replica)

        self.args = HTTPApiArgs.model_validate(args)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.token_digest = bytes.fromhex(token_sha256) if token_sha256 else None
        if self.args.auth and self.token_digest is None:
            raise ValueError("auth is on but no API token digest was given (build the app with app_builder)")
        self.policy = load_policy(policy_path, unnorm_key=self.args.unnorm_key, dtype=self.args.dtype, policy=self.args.policy)
        self.policy.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()  # Ray hides GPUs unless num_gpus > 0
        replica = serve.get_replica_context().replica_id.unique_id.encode()
        self.generator = torch.Generator(device=self.policy.device).manual_seed(self.args.seed * 1_000_003 + zlib.crc32(replica))
        self._infer.set_max_batch_size(self.args.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        cfg = self.policy.model.config
        room = int(cfg.text_config.get("max_position_embeddings", 2048)) - cfg.num_patches - cfg.num_action_tokens - 2
        self.max_prompt_tokens = max(16, min(MAX_PROMPT_TOKENS, room))
        self.stats = {"served": 0, "batches": 0, "forward_passes": 0, "max_batch_size_seen": 0}
        self.version = self.args.model_version

    def _check_auth(self, request: Request) -> None:
        if self.token_digest is None:
            return
        scheme, _, presented = (request.headers.get("authorization") or "").partition(" ")
        if not scheme:
            raise _unauthorized("missing_token", "missing 'Authorization: Bearer <token>' header")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _unauthorized("invalid_request", "the Authorization header must be 'Bearer <token>'", "invalid_request")
        if not hmac.compare_digest(hashlib.sha256(presented.strip().encode("latin-1")).digest(), self.token_digest):
            raise _unauthorized("invalid_token", "the bearer token is not valid", "invalid_token")

    async def _read_json(self, request: Request):
        ctype = request.headers.get("content-type")
        media, _, params = (ctype or "").partition(";")
        charset = params.strip().lower().replace(" ", "")
        if media.strip().lower() != "application/json" or charset not in ("", "charset=utf-8"):
            raise APIError(415, "unsupported_media_type", f"Content-Type must be application/json (UTF-8); got {ctype!r}",
                           "headers.content-type")
        limit = self.args.max_body_bytes
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

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(self, request: Request):
        self._check_auth(request)
        cfg = self.policy.model.config
        return {
            "model": {"image_size": cfg.image_size, "vision_backbone": cfg.vision_backbone,
                      "action_chunk": cfg.action_chunk, "action_dims": cfg.action_dims,
                      "unnorm_key": self.policy.unnorm_key, "unnorm_keys": sorted(self.policy.norm_stats),
                      "model_version": self.version, "dtype": self.args.dtype},
            "limits": {"max_body_bytes": self.args.max_body_bytes, "max_image_side": self.args.max_image_side,
                       "min_image_side": MIN_IMAGE_SIDE, "image_formats": ["png", "jpeg", "raw"],
                       "max_instruction_chars": MAX_INSTRUCTION_CHARS, "max_prompt_tokens": self.max_prompt_tokens,
                       "max_proprio_dims": MAX_PROPRIO_DIMS, "max_temperature": MAX_TEMPERATURE},
            "batching": {"max_batch_size": self.args.max_batch_size, "batch_wait_timeout_s": self.args.batch_wait_timeout_s},
            "stats": {**self.stats, "mean_batch_size": self.stats["served"] / max(self.stats["batches"], 1)},
            "postprocessing": "none: un-normalised env actions; apply env-specific gripper conventions yourself",
        }

    @app.post("/v1/act")
    async def act(self, request: Request):
        start = time.perf_counter()
        self._check_auth(request)
        body = await self._read_json(request)
        try:
            req = ActRequest.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        n_tokens = len(self.policy.prompts.ids(req.instruction))
        if n_tokens > self.max_prompt_tokens:
            raise APIError(422, "invalid_request", f"instruction: {n_tokens} tokens after tokenization; "
                           f"at most {self.max_prompt_tokens} are allowed", "instruction")
        image = await asyncio.to_thread(decode_image, req.image, self.args.max_image_side)
        proprio = np.asarray(req.proprio, np.float32) if req.proprio is not None else None
        temperature = 1.0 if req.temperature is None else req.temperature
        chunk: ActionChunk = await self._infer((Observation(image, req.instruction, proprio), req.greedy, temperature))
        return {"actions": chunk.actions.tolist(), "tokens": chunk.tokens.tolist(), "model_version": chunk.policy_version,
                "unnorm_key": self.policy.unnorm_key, "latency_ms": round((time.perf_counter() - start) * 1000, 3)}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _infer(self, items: list[tuple[Observation, bool, float]]) -> list[ActionChunk]:
        """One forward pass per (greedy, temperature) group of the concurrent requests."""
        groups: dict[tuple[bool, float], list[int]] = {}
        for i, (_, greedy, temperature) in enumerate(items):
            groups.setdefault((greedy, 1.0 if greedy else temperature), []).append(i)
        out: dict[int, ActionChunk] = {}
        for (greedy, temperature), idx in groups.items():
            chunks = await asyncio.to_thread(self.policy.act, [items[i][0] for i in idx], temperature, greedy,
                                             self.version, self.generator)
            out.update(zip(idx, chunks))
            self.stats["forward_passes"] += 1
        self.stats["served"] += len(items)
        self.stats["batches"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(items))
        cache = getattr(self.policy.prompts, "_cache", None)
        if isinstance(cache, dict) and len(cache) > 10_000:  # arbitrary instructions must not grow memory forever
            cache.clear()
        return [out[i] for i in range(len(items))]


def build_app(args: HTTPApiArgs, token: str | None = None) -> Application:
    """Resolves the token (no token + auth on = error); replicas get only its SHA-256, never the plaintext."""
    token = resolve_token(token, args.token_file, args.auth)
    digest = hashlib.sha256(token.encode()).hexdigest() if token else None
    options = {"num_replicas": args.num_replicas, "max_ongoing_requests": max(64, 4 * args.max_batch_size),
               "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus, "resources": args.resources}}
    return PolicyHTTPDeployment.options(**options).bind(args.policy_path, digest, args.model_dump())


def app_builder(args: HTTPApiArgs) -> Application:
    """Serve's typed app builder (`import_path: services.http_api:app_builder`, `args`: HTTPApiArgs fields)."""
    if not isinstance(args, HTTPApiArgs):
        args = HTTPApiArgs.model_validate(dict(args or {}))
    return build_app(args)


def _serve_url(host: str, port: int, scheme: str = "http") -> str:
    try:  # the HTTP options of a Serve instance that was already running win over ours
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        if http.port != port or http.host != host:
            logger.warning("Serve was already running with HTTP on %s:%s; the API is served there", http.host, http.port)
        host, port = http.host or host, http.port
    except Exception:
        pass
    shown = "127.0.0.1" if host in ("0.0.0.0", "", None) else (f"[{host}]" if ":" in host else host)
    return f"{scheme}://{shown}:{port}"


def start_http_api(policy_path: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                   token_file: str | None = None, auth: bool = True, name: str = APP_NAME,
                   ssl_certfile: str | None = None, ssl_keyfile: str | None = None, **kwargs) -> str:
    """Start Serve's HTTP proxy on host:port (if Serve is not running yet), deploy the API at route
    "/" and return its base URL. kwargs: any other HTTPApiArgs field (unnorm_key, max_batch_size, ...)."""
    path = Path(policy_path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a policy folder (no config.json)")
    args = HTTPApiArgs(policy_path=str(path), token_file=token_file, auth=auth, **kwargs)
    application = build_app(args, token)  # fails before anything starts when no token is configured
    if not auth and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("the policy API on %s:%s has auth turned OFF", host, port)
    http = {"host": host, "port": port}
    if ssl_certfile or ssl_keyfile:
        http.update(ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    serve.start(http_options=http)
    serve.run(application, name=name, route_prefix="/")
    return _serve_url(host, port, "https" if ssl_certfile else "http")
