"""Bearer API keys. A key's identity (stored with completions and feedback) is a sha256 prefix,
never the key itself; None when authentication is off. Admin keys are accepted everywhere and are
the only ones that may call the admin endpoints (/v1/adapters*, /v1/training/*).

The operator's paths (OPS_PATHS: /health, /metrics, the /dashboard page and its data; guarded only
with `metrics_auth`) also take the key as the password of HTTP Basic auth (any user name), and their
401 offers Basic beside Bearer: a browser then asks for it (its own sign-in dialog) and sends it with
the page's data requests -- no key in a URL, where access logs and history would keep it -- and
Prometheus' `basic_auth` works as well as its `authorization`."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from fastapi.responses import JSONResponse

from common.errors import AuthenticationError, PermissionDeniedError


def key_identity(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


class ApiKeys:
    def __init__(self, keys: list[str], admin_keys: list[str] = ()):
        every = list(dict.fromkeys([*keys, *admin_keys]))
        self._keys = [(k.encode("utf-8"), key_identity(k)) for k in every]
        self._admins = frozenset(key_identity(k) for k in admin_keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The identity of the presented key; raises AuthenticationError when it is missing or wrong."""
        if not self.enabled:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key")
        presented = token.strip().encode("utf-8")
        found = None
        for key, identity in self._keys:             # compare with every key: no early exit
            if hmac.compare_digest(presented, key):
                found = identity
        if found is None:
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        return found

    def identify_ops(self, authorization: str | None) -> str | None:
        """identify(), also taking `Basic base64(user:key)` (the key as password; as user name when the
        password is empty, as `curl -u key:` sends it)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "basic" or not self.enabled:
            return self.identify(authorization)
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError) as err:
            raise AuthenticationError("Malformed Basic credentials.", code="invalid_api_key") from err
        return self.identify("Bearer " + (password or user))

    def require_admin(self, identity: str | None) -> None:
        """PermissionDeniedError unless auth is off or `identity` is an admin key's."""
        if self.enabled and identity not in self._admins:
            raise PermissionDeniedError("This endpoint needs an admin API key (admin_api_keys, "
                                        "--admin-api-key or ALCHEMIST_ADMIN_KEYS).", code="admin_key_required")


API_PREFIXES = ("/v1/", "/feedback", "/tokenize", "/detokenize")
ADMIN_PREFIXES = ("/v1/adapters", "/v1/training/")       # admin keys only (checked by the routes)
OPS_PATHS = ("/health", "/metrics", "/dashboard", "/dashboard/data")   # its scripts and styles hold no data
OPS_CHALLENGES = [(b"www-authenticate", b"Bearer"),
                  (b"www-authenticate", b'Basic realm="Alchemist metrics", charset="UTF-8"')]
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def guarded_path(path: str, config) -> bool:
    """Whether `path` needs a key when keys are configured (config: ServerConfig)."""
    return (path.startswith(API_PREFIXES) or (config.metrics_auth and path in OPS_PATHS)
            or (config.docs_auth and path in DOCS_PATHS))


class AuthMiddleware:
    """Pure ASGI: checks the key before the body is read (so a bad key is 401 whatever the body),
    and puts the caller's identity in request.state.api_key_id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            state = scope["app"].state.alchemist
            if guarded_path(scope["path"], state.config) and state.api_keys.enabled:
                headers = dict(scope.get("headers") or [])
                raw = headers.get(b"authorization", b"").decode("latin-1")
                ops = scope["path"] in OPS_PATHS
                try:
                    identity = state.api_keys.identify_ops(raw) if ops else state.api_keys.identify(raw)
                except AuthenticationError as err:
                    response = JSONResponse(err.to_dict(), status_code=err.status_code)
                    response.raw_headers += OPS_CHALLENGES if ops else OPS_CHALLENGES[:1]
                    await response(scope, receive, send)
                    return
                scope.setdefault("state", {})["api_key_id"] = identity
        await self.app(scope, receive, send)
