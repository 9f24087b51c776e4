"""Error hierarchy shared by the engine, the trainer and the service.

Each error carries the HTTP status it maps to, so the service converts errors to OpenAI-style JSON
in one place. Errors are built from plain arguments only, so they pickle across Ray processes.
"""


class SdsatError(Exception):
    """Base class. `status` is the HTTP status; `code` the OpenAI-style error type."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequestError(SdsatError, ValueError):
    status = 400
    code = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    status = 400
    code = "context_length_exceeded"


class ConfigError(SdsatError, ValueError):
    """A configuration (training, engine or service) is invalid: unknown key, bad value."""

    status = 400
    code = "invalid_config"


class SatVocabularyError(ConfigError):
    """SAT tokens cannot be set up for this model/tokenizer as asked."""

    code = "sat_vocabulary_error"


class DataError(ConfigError):
    """A corpus is empty or unreadable."""

    code = "data_error"


class OverloadedError(SdsatError):
    status = 503
    code = "overloaded"


class RequestTimeoutError(SdsatError):
    status = 504
    code = "timeout"
