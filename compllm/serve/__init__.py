"""`compllm task=serve`: the whole composed pipe behind an OpenAI-compatible HTTP API.

config.py (the `serve:` schema), schemas.py (request/response bodies), errors.py (OpenAI-style errors),
metrics.py (Prometheus text), service.py (the running pipe: admission, per-query events, cancel), app.py (routes),
launch.py (start/stop the server as a subprocess: tests, benchmark).
Only config.py is imported at compose time; the rest needs FastAPI.
"""
