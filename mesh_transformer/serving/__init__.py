"""Serving completions over HTTP: the app (``app.create_app``) and its parts, one job each, and the
continuous-batching scheduler behind them."""
