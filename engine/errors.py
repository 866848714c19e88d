"""Errors the engine raises for bad input; CLIs print them as one line, HTTP maps them to 4xx."""


class QaaError(ValueError):
    """Base of every user-facing error: the message names the problem."""


class ModelError(QaaError):
    """The model path or checkpoint cannot be used."""


class InputError(QaaError):
    """A prompt or a sampling parameter is not acceptable."""
