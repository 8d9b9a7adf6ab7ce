"""Errors raised while loading a model checkpoint."""

from __future__ import annotations

import os


class ModelLoadError(ValueError):
    """A model cannot be loaded; the one-line message names the file (when there is one) and the problem.

    A ValueError so that callers already guarding bad arguments catch it too.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else os.fspath(path)
        super().__init__(problem if self.path is None else f"{self.path}: {problem}")
