"""Checks that a command's packages are importable before it does any work.

They are core dependencies, so this only fires in a broken or partial install;
then the user gets one line naming what to install instead of a traceback after
the model has loaded.
"""
from __future__ import annotations

import importlib

# import name -> pip name, for the server and the serving benchmark.
SERVER_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic",
                   "prometheus_client": "prometheus-client", "starlette": "starlette"}
HTTP_CLIENT_PACKAGES = {"httpx": "httpx"}


def missing(packages: dict[str, str]) -> list[str]:
    """The pip names of the packages that cannot be imported (they are imported right
    after anyway, so importing them here costs nothing extra)."""
    absent = []
    for module, pip in packages.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(pip)
    return absent


def require(packages: dict[str, str], command: str) -> None:
    """Exit with one line naming the missing packages, if any."""
    absent = missing(packages)
    if absent:
        raise SystemExit(f"orbitllm: error: `{command}` needs {', '.join(absent)}, which "
                         f"{'is' if len(absent) == 1 else 'are'} not installed: "
                         f"pip install {' '.join(absent)}")
