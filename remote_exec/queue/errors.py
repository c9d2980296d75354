"""The error answers of the queue server, raised anywhere below the HTTP layer.

``ApiError(status, code, message, **extra)`` becomes
``{"error": {"code": ..., "message": ..., **extra}}`` with that HTTP status (see the
table in docs/pull-protocol.md); it imports nothing from aiohttp, so the store and its
state machine raise it directly.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An answer other than success: status, snake_case code, a message saying what to
    do, and the extra fields the protocol names (``missing``, ``log_size``...)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def bad_request(message: str, **extra: Any) -> ApiError:
    return ApiError(400, "bad_request", message, **extra)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} does not exist (or is not yours to see)")


def state_error(message: str, **extra: Any) -> ApiError:
    return ApiError(409, "state", message, **extra)
