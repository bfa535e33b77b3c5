"""The ASGI app: OpenAI's audio transcription endpoint in front of the dynamic batcher.

Routes: ``POST /v1/audio/transcriptions`` (multipart: ``file``, ``model``, ``response_format``
json | text | verbose_json, ``language``; ``prompt``/``temperature`` are accepted and
ignored), ``GET /v1/models``, ``GET /health`` (batching counters), ``GET /`` (the page).

Limits answer with OpenAI-shaped JSON errors (``errors.ApiError``) instead of growing without
bound: the request body is counted while it streams in and cut off past ``max_upload_mb``
(413, before the form is even parsed when ``Content-Length`` already says so); audio longer
than ``max_audio_s`` gets 413; bad audio 400/415 naming the problem; a full queue 503 with
``Retry-After``. Shutdown (the lifespan's end) finishes every queued and in-flight request.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from speechllama.serve.batcher import Batcher, BatchInfo, Overloaded, ShuttingDown
from speechllama.serve.engine import Engine
from speechllama.serve.errors import ApiError, error_response
from speechllama.serve.upload import decode_upload

if TYPE_CHECKING:
    from speechllama.decoding.options import DecodingOptions, DecodingResult
    from speechllama.transcribe import Transcriber

__all__ = ["ServeConfig", "create_app"]

log = logging.getLogger("speechllama.serve")

RESPONSE_FORMATS = ("json", "text", "verbose_json")
# Room for the multipart boundaries and the small form fields around the file.
_FORM_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """Server-wide settings. ``max_batch = 1`` (or ``max_wait_ms = 0`` with one client)
    serves requests one at a time. ``aliases`` are other model names clients may send
    (OpenAI clients default to ``whisper-1``)."""

    model_id: str = "speechllama"
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_upload_mb: float = 25.0  # OpenAI's own limit
    max_audio_s: float = 30.0
    languages: tuple[str, ...] = ("en",)
    aliases: tuple[str, ...] = ("whisper-1",)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def create_app(
    transcriber: Transcriber, options: DecodingOptions, config: ServeConfig | None = None
) -> Starlette:
    """The app serving ``transcriber`` with ``options`` (one strategy for every request, so
    any requests can share a batch). The batcher starts and stops with the app's lifespan."""
    config = config or ServeConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = Engine(transcriber, options)
        batcher = Batcher(engine, config.max_batch, config.max_wait_ms / 1000, config.max_queue)
        batcher.start()
        app.state.batcher = batcher
        try:
            yield
        finally:
            await batcher.close()

    async def index(request: Request) -> Response:
        page = importlib.resources.files("speechllama.serve") / "static" / "index.html"
        return HTMLResponse(page.read_text(encoding="utf-8"))

    async def health(request: Request) -> Response:
        batcher: Batcher = request.app.state.batcher
        return JSONResponse(
            {
                "status": "ok",
                "model": config.model_id,
                "strategy": options.strategy,
                "config": asdict(config),
                "stats": batcher.stats(),
            }
        )

    async def models(request: Request) -> Response:
        card = {"id": config.model_id, "object": "model", "created": 0, "owned_by": "speechllama"}
        return JSONResponse({"object": "list", "data": [card]})

    async def transcriptions(request: Request) -> Response:
        started = time.perf_counter()
        form = await _read_form(request, config.max_upload_bytes)
        fmt = _check_fields(form, config)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400,
                "missing the audio file: send it as the multipart field 'file'",
                code="missing_file",
                param="file",
            )
        data = await upload.read()
        name = upload.filename or "upload"
        wave = await run_in_threadpool(decode_upload, data, name, config.max_audio_s)
        try:
            result, batch = await request.app.state.batcher.submit(wave)
        except Overloaded as exc:
            raise ApiError(
                503,
                f"{exc}; retry in {exc.retry_after} s",
                code="server_overloaded",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except ShuttingDown as exc:
            raise ApiError(
                503, str(exc), code="shutting_down", headers={"Retry-After": "5"}
            ) from None
        if result.error:
            reason = result.error.split(": ", 1)[-1]
            raise ApiError(400, f"{name}: {reason}", code="invalid_audio", param="file")
        if fmt == "text":
            return PlainTextResponse(result.text)
        if fmt == "json":
            return JSONResponse({"text": result.text})
        return JSONResponse(_verbose(result, batch, time.perf_counter() - started))

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


async def _read_form(request: Request, limit: int) -> FormData:
    """Parse the multipart body, counting bytes as they arrive: an upload over ``limit`` is
    refused as soon as it passes it (or at once, when ``Content-Length`` says so)."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith("multipart/form-data"):
        raise ApiError(
            400,
            f"expected a multipart/form-data body, got {kind or 'none'!r}",
            code="invalid_content_type",
        )
    declared = request.headers.get("content-length")
    too_large = ApiError(
        413,
        f"upload too large: over the {limit / 2**20:g} MB limit",
        code="upload_too_large",
        param="file",
    )
    if declared and declared.isdigit() and int(declared) > limit + _FORM_OVERHEAD:
        raise too_large

    async def counted() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit + _FORM_OVERHEAD:
                raise too_large
            yield chunk

    try:
        form = await MultiPartParser(request.headers, counted(), max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise ApiError(
            400, f"malformed multipart body: {exc.message}", code="invalid_form"
        ) from None
    upload = form.get("file")
    if isinstance(upload, UploadFile) and upload.size is not None and upload.size > limit:
        raise too_large
    return form


def _check_fields(form: FormData, config: ServeConfig) -> str:
    """Validate ``model``, ``language`` and ``response_format``; returns the format."""
    model = form.get("model")
    if isinstance(model, str) and model and model not in (config.model_id, *config.aliases):
        raise ApiError(
            404,
            f"model {model!r} is not served here (this server has {config.model_id!r})",
            code="model_not_found",
            param="model",
        )
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            f"unsupported response_format {fmt!r}; use one of {', '.join(RESPONSE_FORMATS)}",
            code="unsupported_response_format",
            param="response_format",
        )
    language = form.get("language")
    if isinstance(language, str) and language:
        primary = language.strip().lower().replace("_", "-").split("-")[0]
        if primary not in config.languages and primary != "english":
            raise ApiError(
                400,
                f"unsupported language {language!r}: this model transcribes "
                f"{', '.join(config.languages)}",
                code="unsupported_language",
                param="language",
            )
    return str(fmt)


def _verbose(result: DecodingResult, batch: BatchInfo, total: float) -> dict[str, Any]:
    """OpenAI's verbose_json (task, language, duration, text, one segment) plus the decoding
    statistics: the calls this request took part in, tokens per call, its batch."""
    return {
        "task": "transcribe",
        "language": "english",
        "duration": round(result.audio_seconds, 4),
        "text": result.text,
        "segments": [
            {"id": 0, "start": 0.0, "end": round(result.audio_seconds, 4), "text": result.text}
        ],
        "decoder_calls": result.decoder_calls,
        "tokens": len(result.tokens),
        "tokens_per_call": round(result.tokens_per_call, 4),
        "accepted_per_call": list(result.accepted_per_call),
        "batch": {"id": batch.batch_id, "size": batch.size, "decoder_calls": batch.decoder_calls},
        "timings": {
            "queue_seconds": round(batch.queue_seconds, 4),
            "batch_seconds": round(batch.batch_seconds, 4),
            "encoder_seconds": round(result.encoder_seconds, 4),
            "decoder_seconds": round(result.decoder_seconds, 4),
            "total_seconds": round(total, 4),
        },
    }


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    return error_response(ApiError(exc.status_code, str(exc.detail), code="http_error"))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    return error_response(ApiError(500, f"internal error: {exc}", code="internal_error"))
