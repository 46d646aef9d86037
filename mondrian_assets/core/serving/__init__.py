"""The advisor service: routing, usage accounting, the worker pool; the ASGI app thin."""
