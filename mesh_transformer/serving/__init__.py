"""Serving completions over HTTP: the server and its continuous-batching scheduler."""
