"""``device_serve.py`` and ``mtj-serve``: serve a checkpoint over HTTP (the original /complete,
OpenAI-compatible /v1/...).

    python device_serve.py --config CFG [--host 127.0.0.1] [--port 5000] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mesh_transformer.cli import add_model_arguments, one_line_errors
from mesh_transformer.log import setup_logging
from mesh_transformer.config import ConfigError
from mesh_transformer.inference.engine import load_generator
from mesh_transformer.models.registry import load_config
from mesh_transformer.serving.app import create_app
from mesh_transformer.serving.service import ServerSettings
from mesh_transformer.serving.shutdown import DrainingServer

log = logging.getLogger(__name__)
API_KEY_ENV = "MTJ_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                             f"(default: ${API_KEY_ENV})")
    parser.add_argument("--model-name", default=None, help="the model id in /v1 (default: the config's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="waiting sequences and prompts to score before answering 429")
    parser.add_argument("--steps-per-call", type=int, default=4,
                        help="decode steps per device call (more: faster; fewer: new requests join sooner)")
    parser.add_argument("--context", type=int, default=None, help="KV cache length (default: the config's seq)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request gets 504")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-choices", type=int, default=16, help="prompts x n allowed in one request")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a connection has to send a whole request head before it is closed")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request has to send its whole body before it gets 408")
    parser.add_argument("--max-connections", type=int, default=256,
                        help="connections open at once; beyond that, new connections get 503")
    parser.add_argument("--shutdown-grace", type=float, default=20.0,
                        help="on SIGTERM, seconds the running requests have to finish before they are ended")
    parser.add_argument("--compile-all", action="store_true",
                        help="compile every batch and cache size before serving (no compilation pauses later)")
    parser.add_argument("--cors-origin", action="append", default=[],
                        help="allow browser pages from this origin (repeatable; '*' for any)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


@one_line_errors(ConfigError)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level.upper())
    config = load_config(args.config)
    if args.host not in LOOPBACK and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)
    settings = ServerSettings(
        model_name=args.model_name or config.run.name, api_key=args.api_key, max_batch=args.max_batch,
        max_queue=args.max_queue, steps_per_call=args.steps_per_call, max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout, max_choices=args.max_choices, cors_origins=tuple(args.cors_origin),
        compile_all=args.compile_all, header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        max_connections=args.max_connections, shutdown_grace_s=args.shutdown_grace)

    def build():
        return load_generator(config, args.checkpoint, args.step, max_batch=args.max_batch, context=args.context)

    def stop_server() -> None:
        server.should_exit = True

    app = create_app(settings, build, on_load_failure=stop_server)
    server = DrainingServer(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    server.run()
    return 1 if app.state.service.load_error else 0


if __name__ == "__main__":
    sys.exit(main())
