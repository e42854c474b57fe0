"""`llada serve`: an OpenAI-compatible HTTP server with request batching.

config.py (the server's settings), schemas.py (request bodies -> sampler settings), batcher.py
(the scheduler thread that batches requests into shared sampler calls), metrics.py (/metrics,
kept by prometheus_client), app.py (the FastAPI app; imports fastapi, so it is imported only
when serving).
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
