"""API errors as OpenAI's API shapes them: ``{"error": {"message", "type", "param", "code"}}``.

``type`` is the broad class clients branch on (``invalid_request_error`` for 4xx,
``server_error`` for 5xx, ``overloaded_error`` for 503); ``code`` names the exact problem
(``empty_file``, ``upload_too_large``, ``invalid_audio``, ...), ``message`` says it in one line.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

__all__ = ["ApiError", "error_response"]


class ApiError(Exception):
    """A request that gets an error response; ``headers`` (e.g. ``Retry-After``) go with it."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 503:
            return "overloaded_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


def error_response(error: ApiError) -> JSONResponse:
    body = {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)
