"""The public HTTP policy API for real robots: a Ray Serve app with a FastAPI ingress.

    POST /v1/act    image (PNG | JPEG | raw uint8) + instruction [+ proprio] -> one action chunk
    GET  /v1/info   model facts, limits and batching counters          (Bearer token)
    GET  /healthz   liveness                                            (no auth)

Concurrent requests share one forward pass (`@serve.batch`). Actions are un-normalised env actions, with
no environment-specific post-processing (e.g. LIBERO's gripper flip).
Every client mistake is a 4xx JSON error {"error": {"status", "code", "message", "field"}}.
Contract: docs/serving.md. RayService import path: `services.http_api:app_builder`.
The parts: request schema and app args (http_schemas), errors (http_errors), auth (http_auth),
body reading (http_body), image decoding (image_decoding).
"""

import asyncio
import logging
import time
import zlib
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.records import ActionChunk, Observation
from services.http_auth import check_bearer, resolve_token, token_digest_hex
from services.http_body import finish_body, read_json_body
from services.http_errors import APIError, schema_error
from services.http_schemas import (MAX_INSTRUCTION_CHARS, MAX_PROMPT_TOKENS, MAX_PROPRIO_DIMS, MAX_TEMPERATURE,
                                   MIN_IMAGE_SIDE, ActRequest, HTTPApiArgs, proprio_array)
from services.image_decoding import decode_image

__all__ = ["APP_NAME", "HTTPApiArgs", "app_builder", "build_app", "start_http_api"]

logger = logging.getLogger(__name__)

APP_NAME = "vla-http-api"


app = FastAPI(title="vla-grpo policy API", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    await finish_body(request)  # a closing connection would otherwise reset under the client's upload
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    await finish_body(request)
    return APIError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}", "path",
                    headers=getattr(exc, "headers", None)).response()


@serve.deployment(name="PolicyHTTP", max_ongoing_requests=64, max_queued_requests=512, max_constructor_retry_count=3)
@serve.ingress(app)
class PolicyHTTPDeployment:
    def __init__(self, policy_path: str, token_sha256: str | None, args: dict):
        import torch
        from policy.checkpoint import actor_device, load_policy  # noqa: I001 (heavy imports stay in the replica)

        self.args = HTTPApiArgs.model_validate(args)
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.token_digest = bytes.fromhex(token_sha256) if token_sha256 else None
        if self.args.auth and self.token_digest is None:
            raise ValueError("auth is on but no API token digest was given (build the app with app_builder)")
        self.policy = load_policy(policy_path, unnorm_key=self.args.unnorm_key, dtype=self.args.dtype, policy=self.args.policy,
                                  device=actor_device(self.args.policy))  # Ray hides GPUs unless num_gpus > 0
        self.policy.model.eval()
        if self.args.policy is not None and self.args.policy.cuda_graphs:
            self.policy.use_cuda_graphs(self.args.max_batch_size)  # a lone robot's batch-1 latency: launch-bound eager
        replica = serve.get_replica_context().replica_id.unique_id.encode()
        self.generator = torch.Generator(device=self.policy.device).manual_seed(self.args.seed * 1_000_003 + zlib.crc32(replica))
        self._infer.set_max_batch_size(self.args.max_batch_size)
        self._infer.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        cfg = self.policy.model.config
        room = int(cfg.text_config.get("max_position_embeddings", 2048)) - cfg.num_patches - cfg.num_action_tokens - 2
        self.max_prompt_tokens = max(16, min(MAX_PROMPT_TOKENS, room))
        self.proprio_dim = cfg.proprio_dim if self.policy.uses_proprio else None
        if (self.proprio_dim or 0) > MAX_PROPRIO_DIMS:  # the schema would refuse every request
            raise ValueError(f"the policy reads {self.proprio_dim} proprio values; the API allows {MAX_PROPRIO_DIMS}")
        self.stats = {"served": 0, "batches": 0, "forward_passes": 0, "max_batch_size_seen": 0}
        self.version = self.args.model_version

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(self, request: Request):
        check_bearer(request.headers.get("authorization"), self.token_digest)
        cfg = self.policy.model.config
        return {
            "model": {"image_size": cfg.image_size, "vision_backbone": cfg.vision_backbone,
                      "action_chunk": cfg.action_chunk, "action_dims": cfg.action_dims, "proprio_dim": self.proprio_dim,
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
        check_bearer(request.headers.get("authorization"), self.token_digest)
        body = await read_json_body(request, self.args.max_body_bytes)
        try:
            req = ActRequest.model_validate(body)
        except ValidationError as e:
            raise schema_error(e) from None
        proprio = proprio_array(req.proprio, self.proprio_dim)  # before the batch: one bad request must not fail it
        n_tokens = len(self.policy.prompts.ids(req.instruction))
        if n_tokens > self.max_prompt_tokens:
            raise APIError(422, "invalid_request", f"instruction: {n_tokens} tokens after tokenization; "
                           f"at most {self.max_prompt_tokens} are allowed", "instruction")
        image = await asyncio.to_thread(decode_image, req.image, self.args.max_image_side)
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
    digest = token_digest_hex(token)
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
                   ssl_certfile: str | None = None, ssl_keyfile: str | None = None, route_prefix: str = "/",
                   **kwargs) -> str:
    """Start Serve's HTTP proxy on host:port (if Serve is not running yet), deploy the API at
    `route_prefix` and return its base URL. kwargs: any other HTTPApiArgs field (unnorm_key, max_batch_size, ...)."""
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
    serve.run(application, name=name, route_prefix=route_prefix)
    return _serve_url(host, port, "https" if ssl_certfile else "http") + route_prefix.rstrip("/")
