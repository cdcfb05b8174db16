"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status each failure
gets (400 bad parameters, 429 ResourceExhausted, 503 Unavailable, 504 a deadline, 500 anything else)."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.engine.errors import InvalidRequest, ResourceExhausted
from services.router.errors import Unavailable
from services.router.openai_responses import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


class HttpError(Exception):
    """An error answered with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_response(e: HttpError) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code))
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(body.model_dump(), status_code=e.status, headers=headers)


def http_error_for(e: BaseException) -> HttpError:
    """The HTTP answer to an error raised by the router (the gRPC servicer's status_for, for HTTP)."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, InvalidRequest):
        return HttpError(400, str(e), code="invalid_parameter", param=getattr(e, "param", None))
    if isinstance(e, ResourceExhausted):
        return HttpError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, Unavailable):
        return HttpError(503, str(e), type="server_error", code="service_unavailable")
    if isinstance(e, TimeoutError):
        return HttpError(504, str(e) or "the request timed out", type="server_error", code="timeout")
    log.error("unexpected error in the HTTP server", exc_info=e)
    return HttpError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error")


def validation_error(e: ValidationError | RequestValidationError) -> HttpError:
    errors = e.errors()
    described = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in errors[:3]]
    fields = [str(p) for p in errors[0]["loc"] if p != "body"] if errors else []
    return HttpError(400, "; ".join(described) or "invalid request", code="invalid_parameter",
                     param=fields[0] if fields else None)


def code_for(status: int) -> str | None:
    """OpenAI's error code for a status the framework answers itself (unknown path, wrong method)."""
    return {404: "not_found", 405: "method_not_allowed"}.get(status)
