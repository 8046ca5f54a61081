"""HTTP serving on FastAPI + uvicorn: ``create_app`` puts together the service (the model, loaded in
the background), the endpoints of ``routes``, the middleware and the error handlers.

The endpoints are the original ``POST /complete``, OpenAI-compatible ``POST /v1/completions`` and
``GET /v1/models``, ``GET /health``, and OpenAPI docs at ``/docs``. Requests are validated by the
typed models of ``schemas``; every invalid field is answered with HTTP 400 and an OpenAI-style error
``{"error": {"message", "type", "param", "code"}}`` naming the field. Generation runs on the
continuous-batching loop of ``scheduler``. ``/health`` answers 503 until the model is loaded and
compiled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mesh_transformer.inference.engine import Generator
from mesh_transformer.serving import routes
from mesh_transformer.serving.middleware import add_error_handlers, add_middleware
from mesh_transformer.serving.service import ServerSettings, Service


def create_app(settings: ServerSettings, build_generator: Callable[[], Generator],
               on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app; ``build_generator`` runs on a background thread once the server starts."""
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        threading.Thread(target=service.load, args=(build_generator, on_load_failure), name="model-loader",
                         daemon=True).start()
        yield
        service.close()

    app = FastAPI(title="mesh-transformer", summary="Text completion with a mesh-transformer model",
                  lifespan=lifespan)
    app.state.service = service
    app.include_router(routes.router)
    add_error_handlers(app)
    add_middleware(app, service)
    return app
