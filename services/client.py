"""A small client for the HTTP policy API (services/http_api.py): standard library + numpy only.

    client = PolicyClient("http://robot-server:8000", token=os.environ["VLA_API_TOKEN"])
    out = client.act(rgb_uint8_hxwx3, "put the red block in the bowl")
    out["actions"]  # [chunk][dims] un-normalised env actions (no gripper post-processing)

Images travel as PNG (lossless), encoded here without Pillow. A 4xx/5xx answer raises
PolicyAPIError carrying the server's JSON error body.
"""

from __future__ import annotations

import base64
import json
import struct
import urllib.error
import urllib.request
import zlib

import numpy as np


class PolicyAPIError(RuntimeError):
    """The server answered with an error status. `.body` is its parsed JSON (or raw text)."""

    def __init__(self, status: int, body, url: str):
        self.status, self.body, self.url = status, body, url
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.code = err.get("code") if isinstance(err, dict) else None
        self.field = err.get("field") if isinstance(err, dict) else None
        message = err.get("message") if isinstance(err, dict) and err.get("message") else str(body)[:500]
        super().__init__(f"HTTP {status} from {url}: {message}")


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (8-bit RGB, no filtering)."""
    image = np.ascontiguousarray(image)
    h, w, _ = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
            + chunk(b"IEND", b""))


class PolicyClient:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0, proxies: dict | None = None):
        """`proxies=None` talks to the server directly, ignoring HTTP(S)_PROXY from the environment."""
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies or {}))

    def healthz(self) -> dict:
        return self._request("GET", "/healthz", auth=False)

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def act(self, image: np.ndarray, instruction: str, proprio=None, greedy: bool = True,
            temperature: float | None = None) -> dict:
        """One action chunk for an [H, W, 3] uint8 RGB image. Returns the server's JSON:
        actions [chunk][dims], tokens, model_version, unnorm_key, latency_ms."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an [H, W, 3] uint8 RGB array, got {image.dtype} {image.shape}")
        body = {"image": {"format": "png", "data": base64.b64encode(encode_png(image)).decode("ascii")},
                "instruction": instruction, "greedy": bool(greedy)}
        if proprio is not None:
            body["proprio"] = [float(x) for x in np.asarray(proprio, dtype=np.float64).ravel()]
        if temperature is not None:
            body["temperature"] = float(temperature)
        return self._request("POST", "/v1/act", body)

    def _request(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> dict:
        url = self.base_url + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
            raise PolicyAPIError(e.code, parsed, url) from None
