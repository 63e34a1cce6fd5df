"""The public HTTP policy API over real HTTP: the Serve app on a free localhost port inside the session
Ray cluster, with the tiny policy (and at /proprio one that reads proprio). Good requests, >20 kinds of
bad ones (each a 4xx JSON error naming the problem, never a 5xx), proprio rules, oversized bodies on
keep-alive and closing connections, batching of concurrent requests, the Python client."""

import base64
import http.client
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

TOKEN = "test-token-0123456789abcdefghij"
APP = "vla-http-api-test"
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
INSTRUCTION = "put the red block in the bowl"
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api(ray_cluster, tiny_policy_dir):
    from ray import serve

    from services.http_api import start_http_api

    url = start_http_api(str(tiny_policy_dir), host="127.0.0.1", port=_free_port(), token=TOKEN, name=APP,
                         max_batch_size=8, batch_wait_timeout_s=0.05, num_cpus=0, torch_threads=1)
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def proprio_api(api, tiny_config, tmp_path_factory):
    """The same API at /proprio (same proxy) for a tiny policy built with policy.use_proprio=true."""
    from ray import serve

    from policy.checkpoint import build_policy, save_policy
    from services.http_api import start_http_api

    cfg = tiny_config.policy.model_copy(update={"use_proprio": True})
    folder = save_policy(build_policy(cfg, seed=0), tmp_path_factory.mktemp("policy") / "tiny_proprio")
    url = start_http_api(str(folder), host="127.0.0.1", port=urlparse(api).port, token=TOKEN, name=APP + "-proprio",
                         route_prefix="/proprio", max_batch_size=8, batch_wait_timeout_s=0.05, num_cpus=0,
                         torch_threads=1)
    yield url
    serve.delete(APP + "-proprio")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encoded(img: np.ndarray, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **save)
    return buf.getvalue()


def body_for(img=IMG, fmt="png", **extra) -> dict:
    if fmt == "raw":
        image = {"format": "raw", "data": b64(img.tobytes()), "shape": list(img.shape)}
    else:
        image = {"format": fmt, "data": b64(encoded(img, fmt.upper()))}
    return {"image": image, "instruction": INSTRUCTION, **extra}


def call(url, path="/v1/act", body=None, method="POST", token=TOKEN, ctype="application/json", headers=None,
         conn=None):
    """One request with full control over the bytes; returns (status, headers, parsed JSON body).
    With `conn`, on that open connection, which stays open."""
    u = urlparse(url)
    keep, conn = conn is not None, conn or http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    path = u.path + path  # the app's route prefix
    h = {"Content-Type": ctype} if ctype else {}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, (json.loads(data) if data else None)
    finally:
        if not keep:
            conn.close()


def check_chunk(out: dict):
    actions, tokens = np.asarray(out["actions"]), np.asarray(out["tokens"])
    assert actions.shape == (8, 7) and np.isfinite(actions).all()
    assert tokens.shape == (8, 7) and ((tokens >= 32000 - 256) & (tokens < 32000)).all()
    assert out["model_version"] == 0 and out["unnorm_key"] == "identity" and out["latency_ms"] > 0


# ---------------------------------------------------------------- good requests
@pytest.mark.parametrize("fmt,shape,extra", [
    ("png", (64, 64), {}),
    ("jpeg", (120, 160), {"proprio": [0.1, -0.2, 0.3, 0, 1, 2, 3, 4]}),
    ("raw", (48, 80), {"proprio": [1.5]}),
    ("png", (1024, 16), {"greedy": False, "temperature": 1.6}),
])
def test_good_request(api, fmt, shape, extra):
    img = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    status, _, out = call(api, body=body_for(img, fmt, **extra))
    assert status == 200, out
    check_chunk(out)


def test_greedy_is_deterministic_and_png_equals_raw(api):
    outs = [call(api, body=body_for(IMG, fmt))[2] for fmt in ("png", "png", "raw")]
    assert outs[0]["actions"] == outs[1]["actions"] == outs[2]["actions"]
    assert outs[0]["tokens"] == outs[1]["tokens"] == outs[2]["tokens"]


def test_healthz_without_auth_and_info(api):
    assert call(api, "/healthz", method="GET", token=None, ctype=None)[:3:2] == (200, {"status": "ok"})
    status, _, info = call(api, "/v1/info", method="GET", ctype=None)
    assert status == 200
    assert info["model"]["image_size"] == 64 and info["model"]["action_chunk"] == 8 and info["model"]["action_dims"] == 7
    assert info["model"]["unnorm_key"] == "identity" and info["model"]["model_version"] == 0
    assert info["model"]["proprio_dim"] is None  # configs/tiny.yaml: a policy that does not read proprio
    assert info["limits"]["max_body_bytes"] == 8 * MiB and info["limits"]["max_image_side"] == 1024
    assert {"served", "batches", "forward_passes", "mean_batch_size"} <= set(info["stats"])


def test_python_client(api):
    from services.client import PolicyAPIError, PolicyClient

    client = PolicyClient(api, token=TOKEN, timeout_s=30)
    assert client.healthz() == {"status": "ok"}
    assert client.info()["model"]["action_dims"] == 7
    out = client.act(IMG, INSTRUCTION, proprio=np.zeros(8, np.float32))
    check_chunk(out)
    assert out["tokens"] == call(api, body=body_for(IMG, "raw"))[2]["tokens"], "client PNG must be lossless"
    with pytest.raises(PolicyAPIError) as e:
        PolicyClient(api, token="wrong-token-0123456789abcdef").act(IMG, INSTRUCTION)
    assert e.value.status == 401 and e.value.code == "invalid_token" and "not valid" in str(e.value)
    with pytest.raises(PolicyAPIError) as e:
        client.act(IMG, "")
    assert e.value.status == 422 and e.value.field == "instruction"
    with pytest.raises(ValueError, match="uint8"):
        client.act(IMG.astype(np.float32), INSTRUCTION)
    noise = np.random.default_rng(1).integers(0, 256, (1700, 1700, 3), dtype=np.uint8)  # 11.6 MB as base64 PNG
    with pytest.raises(PolicyAPIError) as e:  # urllib sends Connection: close: a 413, not a connection reset
        PolicyClient(api, token=TOKEN, timeout_s=60).act(noise, INSTRUCTION)
    assert e.value.status == 413 and e.value.code == "body_too_large" and e.value.field == "body"


def test_concurrent_requests_share_forward_passes(api):
    before = call(api, "/v1/info", method="GET", ctype=None)[2]["stats"]
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        return call(api, body=body_for(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), "raw"))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(status == 200 for status, _, _ in results), [r[2] for r in results]
    after = call(api, "/v1/info", method="GET", ctype=None)[2]["stats"]
    served = after["served"] - before["served"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert served == 8 and passes < 8 and after["max_batch_size_seen"] >= 2, (before, after)


# ---------------------------------------------------------------- bad requests
def _png_of(mode: str, size=(32, 32)) -> str:
    return b64(encoded(np.asarray(Image.new(mode, size)), "PNG"))


def _with(**changes) -> dict:
    b = body_for()
    for key, value in changes.items():
        target, *path = key.split("__")
        if path:
            b[target][path[0]] = value
        elif value is _DROP:
            b.pop(target, None)
        else:
            b[target] = value
    return b


_DROP = object()
_VALID_PNG = encoded(IMG, "PNG")
_RAW = {"format": "raw", "data": b64(IMG.tobytes()), "shape": [64, 64, 3]}
BAD = {  # name: (call kwargs, status, text that the error's field or message must contain)
    "missing token": (dict(token=None), 401, "authorization"),
    "wrong token": (dict(token="not-the-token-0123456789"), 401, "not valid"),
    "basic auth scheme": (dict(token=None, headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401, "Bearer"),
    "info without token": (dict(path="/v1/info", method="GET", token=None), 401, "authorization"),
    "missing instruction": (dict(body=_with(instruction=_DROP)), 422, "instruction"),
    "missing image": (dict(body=_with(image=_DROP)), 422, "image"),
    "missing image data": (dict(body={"image": {"format": "png"}, "instruction": INSTRUCTION}), 422, "image.data"),
    "unknown image format": (dict(body=_with(image__format="gif")), 422, "image.format"),
    "raw without shape": (dict(body=_with(image={**_RAW, "shape": None})), 422, "shape"),
    "shape with png": (dict(body=_with(image__shape=[64, 64, 3])), 422, "only for raw"),
    "raw shape of 2 dims": (dict(body=_with(image={**_RAW, "shape": [64, 192]})), 422, "image.shape"),
    "raw data length mismatch": (dict(body=_with(image={**_RAW, "shape": [64, 63, 3]})), 422, "do not match"),
    "raw 4 channels": (dict(body=_with(image={**_RAW, "shape": [64, 48, 4]})), 422, "channels"),
    "raw huge dimensions": (dict(body=_with(image={**_RAW, "shape": [100000, 100000, 3]})), 422, "16..1024"),
    "png huge dimensions": (dict(body=_with(image__data=b64(encoded(np.zeros((16, 2000, 3), np.uint8), "PNG")))),
                            422, "16x2000"),
    "png too small": (dict(body=_with(image__data=b64(encoded(np.zeros((8, 8, 3), np.uint8), "PNG")))), 422, "8x8"),
    "corrupt base64": (dict(body=_with(image__data="!!not base64!!")), 422, "base64"),
    "non-ascii base64": (dict(body=_with(image__data="ÿÿÿÿ")), 422, "base64"),
    "corrupt png": (dict(body=_with(image__data=b64(b"\x89PNG\r\n\x1a\n" + bytes(200)))), 422, "PNG"),
    "truncated png": (dict(body=_with(image__data=b64(_VALID_PNG[: len(_VALID_PNG) // 2]))), 422, "corrupt PNG"),
    "png declared as jpeg": (dict(body=_with(image__format="jpeg")), 422, "not a JPEG"),
    "rgba png": (dict(body=_with(image__data=_png_of("RGBA"))), 422, "RGBA"),
    "grayscale png": (dict(body=_with(image__data=_png_of("L"))), 422, "'L'"),
    "non-utf8 body": (dict(body=b'{"instruction": "\xff\xfe"}'), 400, "UTF-8"),
    "non-json body": (dict(body=b"instruction=pick"), 400, "not valid JSON"),
    "empty body": (dict(body=b""), 400, "empty"),
    "deeply nested json": (dict(body=b"[" * 100_000 + b"]" * 100_000), 400, "not valid JSON"),
    "json array body": (dict(body=[1, 2]), 422, "body"),
    "text/plain content type": (dict(body=body_for(), ctype="text/plain"), 415, "Content-Type"),
    "missing content type": (dict(body=body_for(), ctype=None), 415, "Content-Type"),
    "latin-1 charset": (dict(body=body_for(), ctype="application/json; charset=latin-1"), 415, "UTF-8"),
    "empty instruction": (dict(body=_with(instruction="")), 422, "instruction"),
    "blank instruction": (dict(body=_with(instruction="   ")), 422, "blank"),
    "too long instruction": (dict(body=_with(instruction="a" * 513)), 422, "instruction"),
    "nan in proprio": (dict(body=json.dumps(_with(proprio=[0.0, float("nan")])).encode()), 422, "proprio.1"),
    "infinity temperature": (dict(body=json.dumps(_with(temperature=float("inf"))).encode()), 422, "temperature"),
    "too long proprio": (dict(body=_with(proprio=[0.0] * 65)), 422, "proprio"),
    "proprio of strings": (dict(body=_with(proprio=["a"])), 422, "proprio.0"),
    "unknown field": (dict(body=_with(gripper="open")), 422, "gripper"),
    "unknown image field": (dict(body=_with(image__colour="rgb")), 422, "image.colour"),
    "greedy as string": (dict(body=_with(greedy="yes")), 422, "greedy"),
    "instruction as number": (dict(body=_with(instruction=5)), 422, "instruction"),
    "zero temperature": (dict(body=_with(temperature=0)), 422, "temperature"),
    "wrong method": (dict(method="GET", body=None, ctype=None), 405, "GET"),
    "unknown path": (dict(path="/v1/nope"), 404, "/v1/nope"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_is_a_named_4xx(api, name):
    kwargs, status, text = BAD[name]
    got, headers, body = call(api, **kwargs)
    assert got == status, (name, got, body)
    err = body["error"]
    assert err["status"] == status and err["code"] and text in f"{err['field']} {err['message']}", body
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")


# ---------------------------------------------------------------- oversized bodies
BIG = b'{"instruction": "' + b"a" * (24 * MiB) + b'"}'  # 3x the limit: answered early, a closing socket resets


def _over_limit(kind):  # a fresh iterator each time: http.client sends an iterator chunked
    return BIG if kind == "declared" else iter([b"x" * MiB] * 24)


@pytest.mark.parametrize("kind", ["declared", "chunked"])
def test_oversized_body_keeps_a_keep_alive_connection(api, kind):
    conn = http.client.HTTPConnection(urlparse(api).hostname, urlparse(api).port, timeout=60)
    try:
        status, _, err = call(api, body=_over_limit(kind), conn=conn)
        assert status == 413 and err["error"]["code"] == "body_too_large" and err["error"]["field"] == "body", err
        status, _, out = call(api, body=body_for(), conn=conn)  # the proxy dropped the rest of the big body
        assert status == 200, out
        check_chunk(out)
    finally:
        conn.close()


@pytest.mark.parametrize("kind,token,status", [("declared", TOKEN, 413), ("chunked", TOKEN, 413),
                                               ("declared", "wrong-token-0123456789abcdef", 401)])
def test_an_error_on_a_closing_connection_is_answered_not_reset(api, kind, token, status):
    # Connection: close (urllib's): the app reads the body's rest first, else the client sees a reset, not the answer
    got, _, err = call(api, body=_over_limit(kind), token=token, headers={"Connection": "close"})
    assert got == status and err["error"]["status"] == status, err


def test_http_1_0_oversized_body_is_a_413(api):
    u = urlparse(api)
    head = (f"POST /v1/act HTTP/1.0\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(BIG)}\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(head + BIG)
        data = b""
        while chunk := s.recv(65536):  # HTTP/1.0: the server closes after the answer
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    assert status_line.split()[1] == b"413", data[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"


@pytest.mark.parametrize("close", [False, True])
def test_declared_content_length_over_limit_is_refused_before_the_body(api, close):
    u = urlparse(api)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/act")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", "Content-Length": str(64 * MiB)}
    for k, v in {**headers, **({"Connection": "close"} if close else {})}.items():
        conn.putheader(k, v)
    conn.endheaders()  # no body is ever sent; a closing connection is answered once nothing arrives for a second
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    conn.close()


# ---------------------------------------------------------------- proprio
PROPRIO = [0.1, -0.2, 0.3, 0.0, 0.5, -0.5, 1.0, 0.04]


@pytest.mark.parametrize("proprio,given", [(_DROP, "required"), ([0.0], "1 value"), ([], "0 value"),
                                           ([0.0] * 9, "9 value"), ([0.0] * 7, "7 value")])
def test_a_proprio_policy_needs_exactly_its_proprio_dim(proprio_api, proprio, given):
    status, _, body = call(proprio_api, body=_with(proprio=proprio))
    assert status == 422, body
    err = body["error"]
    assert err["field"] == "proprio" and given in err["message"] and "exactly 8" in err["message"], err


def test_a_proprio_policy_reads_proprio_and_reports_its_dim(proprio_api):
    info = call(proprio_api, "/v1/info", method="GET", ctype=None)[2]
    assert info["model"]["proprio_dim"] == 8
    outs = [call(proprio_api, body=_with(proprio=p)) for p in (PROPRIO, PROPRIO, [1.0] * 8)]
    assert all(status == 200 for status, _, _ in outs), outs
    check_chunk(outs[0][2])
    assert outs[0][2]["tokens"] == outs[1][2]["tokens"] and outs[0][2]["tokens"] != outs[2][2]["tokens"]


def test_bad_proprio_does_not_fail_the_batch_it_would_join(proprio_api):
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        return call(proprio_api, body=_with(proprio=PROPRIO if i % 2 else [0.0]))[0]

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(one, range(8))) == [200] * 4 + [422] * 4


def test_a_policy_without_proprio_ignores_the_field(api):
    plain = call(api, body=body_for())
    with_proprio = call(api, body=body_for(proprio=[100.0] * 3))
    assert plain[0] == with_proprio[0] == 200 and plain[2]["tokens"] == with_proprio[2]["tokens"]


def test_still_serves_after_bad_requests(api):
    status, _, out = call(api, body=body_for())
    assert status == 200
    check_chunk(out)


# ---------------------------------------------------------------- configuration
def test_auth_is_on_by_default_and_needs_a_token(tmp_path, monkeypatch, tiny_policy_dir):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from services.http_api import app_builder
    from services.http_auth import resolve_token

    monkeypatch.delenv("VLA_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no API token is configured"):
        app_builder({"policy_path": str(tiny_policy_dir)})
    with pytest.raises(ValueError, match="cannot read the API token file"):
        resolve_token(token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="16-512 characters"):
        resolve_token("short")
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert resolve_token(token_file=str(tmp_path / "token")) == TOKEN
    monkeypatch.setenv("VLA_API_TOKEN", TOKEN)
    assert resolve_token() == TOKEN
    assert resolve_token(auth=False) is None
    # Serve's typed builder convention (what a RayService `import_path` + `args` goes through)
    built = call_user_app_builder_with_args_if_necessary(
        app_builder, {"policy_path": str(tiny_policy_dir), "token_file": str(tmp_path / "token"), "max_batch_size": 4})
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="max_batch_sise"):
        call_user_app_builder_with_args_if_necessary(app_builder, {"policy_path": "x", "max_batch_sise": 4})


def test_serve_command_refuses_without_policy_or_token(monkeypatch, tiny_config, tiny_policy_dir):
    from deploy.serve import run_serve

    monkeypatch.delenv("VLA_API_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="policy.path"):
        run_serve(tiny_config)
    cfg = tiny_config.model_copy(update={"policy": tiny_config.policy.model_copy(update={"path": tiny_policy_dir})})
    with pytest.raises(SystemExit, match="no API token is configured"):
        run_serve(cfg)
