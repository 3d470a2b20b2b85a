"""Typed errors. The server maps every AlchemistError to an OpenAI-style error JSON with its status."""
from __future__ import annotations


class AlchemistError(Exception):
    """Base error that carries an HTTP status and OpenAI error fields."""

    status_code: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequestError(AlchemistError):
    status_code = 400


class ConfigError(AlchemistError):
    """A configuration that cannot work; the message says what to change."""
    status_code = 500
    error_type = "config_error"


class AuthenticationError(AlchemistError):
    status_code = 401
    error_type = "authentication_error"


class PermissionDeniedError(AlchemistError):
    status_code = 403
    error_type = "permission_error"


class NotFoundError(AlchemistError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(AlchemistError):
    status_code = 409
    error_type = "conflict_error"


class OverloadedError(AlchemistError):
    """Queue full: the client should retry later (Retry-After)."""
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class UnavailableError(AlchemistError):
    status_code = 503
    error_type = "service_unavailable"
