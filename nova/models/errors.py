from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model directory or file could not be loaded; the message names what and why."""


class InvalidInputError(ValueError):
    """A request's input (prompt, image, parameters) is not acceptable; the message says why."""
