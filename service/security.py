"""Optional API keys: when FACE_API_KEYS is set, every endpoint but /health and /ready needs one (the OpenAPI
document and its viewers too, unless FACE_PUBLIC_DOCS is set; see service.api.docs).

A key travels as `X-API-Key: <key>` or `Authorization: Bearer <key>`. Keys are compared in constant time
(hmac.compare_digest against every configured key, without stopping at the first hit) so response timing
does not leak how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated, ClassVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.errors import FaceServiceError


class Unauthorized(FaceServiceError):
    """No API key, or a wrong one. An HTTP-layer error, so it lives with the HTTP-layer check."""

    code = "unauthorized"
    status = 401
    headers: ClassVar[dict[str, str]] = {
        "WWW-Authenticate": 'Bearer realm="facerec", ApiKey header="X-API-Key"'
    }


# auto_error=False: a missing header must reach our check (and our error shape), not FastAPI's 403.
# The schemes also put an "Authorize" button on /docs.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from FACE_API_KEYS.")
_bearer = HTTPBearer(auto_error=False, description="An API key from FACE_API_KEYS, as a bearer token.")


def key_matches(candidate: str, keys: list[str]) -> bool:
    """True when `candidate` equals one of `keys`; every key is compared, each in constant time."""
    supplied = candidate.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(supplied, key.encode())
    return found


async def require_api_key(
    request: Request,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    candidate = api_key if api_key else (bearer.credentials if bearer else None)
    if not candidate:
        raise Unauthorized("an API key is required: send X-API-Key or Authorization: Bearer")
    if not key_matches(candidate, keys):
        raise Unauthorized("the API key is not valid")
