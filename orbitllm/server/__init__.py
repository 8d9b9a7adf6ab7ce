"""The OpenAI-compatible HTTP server (``orbitllm serve``).

Importing this package is cheap: FastAPI, uvicorn, pydantic and prometheus-client
load only with ``orbitllm.server.api_server`` and the modules it uses.
"""
