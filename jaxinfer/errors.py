"""Typed errors for everything a user can get wrong.

Every error raised for bad input (a request, a file, a flag) is a `JaxinferError`, and its message
says what to change. The HTTP server maps `InvalidRequestError` to a 400 in the OpenAI error format;
the engine catches these before anything reaches the device, so bad input never costs another
request its work.
"""

from __future__ import annotations


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose."""


class InvalidRequestError(JaxinferError, ValueError):
    """A request (prompt or sampling parameters) that cannot be served as given.

    Attributes:
      param: the request field at fault, where one is (the server's 400 names it), else None.
    """

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class EmptyPromptError(InvalidRequestError):
    """The prompt has no tokens."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context window."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of its valid range."""


class ModelNotFoundError(JaxinferError, FileNotFoundError):
    """A model name that is neither registered nor a path to a file."""


class CheckpointError(JaxinferError):
    """A weight file that cannot be read: truncated, corrupt, or of a kind we cannot load."""


class UnsupportedModelError(CheckpointError):
    """A checkpoint of an architecture or tensor type jaxinfer does not implement."""


class TokenizerError(JaxinferError):
    """A tokenizer that cannot be built from the files or metadata given."""


class ChatTemplateError(InvalidRequestError):
    """A chat request the model's template cannot render (bad roles, missing template)."""


class InvalidStructuredOutputError(InvalidRequestError):
    """A JSON schema, regex, choice list or grammar that cannot constrain generation.

    Attributes:
      field: which constraint it was ("json", "regex", "choice", "grammar", "json_object"), so
        the server can name the request field that carried it.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
