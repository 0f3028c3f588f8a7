"""Errors of the OpenAI-compatible server, in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise :class:`APIError`; :func:`install_error_handlers` also turns FastAPI's validation errors (a 400
naming the field, or saying the body is not JSON) and Starlette's HTTP errors (404, 405, unparsable bodies)
into that shape.
"""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """A request the server refuses: answered with ``status`` and an OpenAI-shaped body (``param``: the
    offending field, ``code``: a machine-readable reason, ``headers``: e.g. ``Retry-After``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status, message, param=None, code=None, type_="invalid_request_error", headers=None):
    """The OpenAI-shaped JSON error response."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def api_error_handler(request, e: APIError):
    return error_response(e.status, e.message, e.param, e.code, headers=e.headers)


async def validation_error_handler(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid" or param is None:
        return error_response(400, f"request body is not valid JSON: {first.get('msg', 'parse error')}", None,
                              "invalid_json")
    return error_response(400, f"invalid value for '{param}': {first.get('msg')}", param, "invalid_value")


async def http_error_handler(request, e: StarletteHTTPException):
    msg = str(e.detail)
    if e.status_code == 400 and "parsing the body" in msg:
        msg = "request body could not be parsed (not valid UTF-8 JSON)"
    return error_response(e.status_code, msg, None, None, headers=getattr(e, "headers", None))


def install_error_handlers(app) -> None:
    """Answer :class:`APIError`, request validation errors and HTTP errors of ``app`` in OpenAI's shape."""
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
