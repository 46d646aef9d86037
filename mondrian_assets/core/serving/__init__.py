"""The advisor service: routing, usage accounting, the worker pool, constrained decoding; the ASGI app thin."""
