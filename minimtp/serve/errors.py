"""Every error the server returns is an OpenAI error object, ``{"error": {"message", "type", "param", "code"}}``,
with the status that names its cause: 400 bad request (validation too: never 422), 401 wrong key, 404 unknown model
or path, 405 wrong method, 408 a body that does not arrive, 413 a body over the limit, 500 a failure of ours, 503
busy or shutting down (with Retry-After). Never a traceback or plain text (docs: guides/serving, "Errors")."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("minimtp.serve")

KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    500: "internal_error",
    503: "server_busy",
}


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or KINDS.get(status, "error"), "param": param, "code": status}}


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class APIError(Exception):
    """Raised by a handler: becomes the OpenAI error object of ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.headers = headers


def install_handlers(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's own errors (validation, 404, 405, anything raised) to OpenAI error objects."""

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return error(exc.status, str(exc), exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        return error(400, f"{where}: {e.get('msg', 'invalid value')}", where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            return error(404, f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error(405, f"method {request.method} is not allowed on {request.url.path}", headers=exc.headers)
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return error(500, f"internal error ({type(exc).__name__}): the request was not completed")
