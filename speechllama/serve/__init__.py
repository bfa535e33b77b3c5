"""An HTTP transcription service speaking OpenAI's audio transcription API, with dynamic
batching across requests (``batcher``), the ASGI app (``app``), upload decoding (``upload``),
the page at ``/`` (``static/index.html``) and a bounded load generator (``loadtest``).

Needs the ``serve`` extra (starlette, uvicorn, python-multipart; httpx for the load test):
``pip install 'speechllama[serve]'``."""

from __future__ import annotations

from speechllama.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
