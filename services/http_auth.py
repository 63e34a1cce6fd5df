"""Bearer-token auth of the policy API: which token is in force (explicit > token file > $VLA_API_TOKEN)
and the constant-time check of a request's Authorization header. Replicas hold only the token's
SHA-256, so the plaintext never reaches the Serve config, deployment arguments or dashboard."""

import hashlib
import hmac
import os
import re
from pathlib import Path

from services.http_errors import APIError

TOKEN_ENV = "VLA_API_TOKEN"
TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]{16,512}=*")
REALM = 'Bearer realm="vla-grpo"'


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


def token_digest_hex(token: str | None) -> str | None:
    """The hex digest the replicas get instead of the token; None when auth is off."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_bearer(authorization: str | None, token_digest: bytes | None) -> None:
    """Raise a 401 APIError unless `authorization` is 'Bearer <the token>'; no digest = auth off."""
    if token_digest is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if not scheme:
        raise _unauthorized("missing_token", "missing 'Authorization: Bearer <token>' header")
    if scheme.lower() != "bearer" or not presented.strip():
        raise _unauthorized("invalid_request", "the Authorization header must be 'Bearer <token>'", "invalid_request")
    # digests of equal length, compared in constant time: neither the token nor its length leaks through timing
    if not hmac.compare_digest(hashlib.sha256(presented.strip().encode("latin-1")).digest(), token_digest):
        raise _unauthorized("invalid_token", "the bearer token is not valid", "invalid_token")


def _unauthorized(code: str, message: str, error: str | None = None) -> APIError:
    www = REALM + (f', error="{error}"' if error else "")
    return APIError(401, code, message, "headers.authorization", headers={"WWW-Authenticate": www})
