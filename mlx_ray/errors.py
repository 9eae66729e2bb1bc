"""One error taxonomy for all of mlx-ray.

The engine, the converter and the CLI raise these; only the HTTP ingress maps
them to status codes (``mlx_ray.serve.ingress``), and only the CLI maps them to
exit codes (``mlx_ray.cli``). Messages are one line and say what to do next.
"""

from __future__ import annotations


class MlxRayError(Exception):
    """Base class. ``kind`` is the stable machine-readable category."""

    kind = "internal_error"
    # Whether a client should repeat the request as it is (HTTP: the ``x-should-retry`` header the
    # official openai SDKs obey over their own rules); None: the status code's usual meaning.
    retryable: bool | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split())


class BadRequest(MlxRayError):
    """The caller's input is invalid (bad parameter, bad config, bad combination)."""

    kind = "invalid_request_error"


class ContextOverflow(BadRequest):
    """Prompt plus max_tokens exceeds the model's context."""

    kind = "context_length_exceeded"


class RequestTooLarge(BadRequest):
    """The request body (or a prompt's text) is too large to possibly fit the model's context;
    refused before it is parsed or tokenized."""

    kind = "request_too_large"


class NotFound(MlxRayError):
    """A model, path or repository does not exist (or is not reachable offline)."""

    kind = "not_found_error"


class Conflict(MlxRayError):
    """The target exists or is being written by someone else."""

    kind = "conflict_error"


class Overloaded(MlxRayError):
    """Admission control refused the request; retry later."""

    kind = "overloaded_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(MlxRayError):
    """Nothing can take the request now (every arm behind the router is down); retry after
    ``retry_after`` seconds."""

    kind = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class DeadlineExceeded(MlxRayError):
    """The request ran past a deadline its caller set (the request's own ``timeout``).

    Not retryable as it is: the same request under the same deadline repeats the work and the outcome."""

    kind = "timeout_error"
    retryable = False


class FirstTokenTimeout(MlxRayError):
    """No first token within the server's first-token timeout (queueing plus prefill); the request
    was cancelled, so nothing of it runs any more: retryable."""

    kind = "first_token_timeout"
    retryable = True


class StallTimeout(MlxRayError):
    """Tokens were generated, then none for the server's stall timeout; the request was cancelled.
    Not retryable as it is: a retry would redo the work already done."""

    kind = "stall_timeout"
    retryable = False


class UpstreamTimeout(MlxRayError):
    """The model's replica did not answer in time (wedged or gone); the request was cancelled."""

    kind = "upstream_timeout_error"


class EngineFault(MlxRayError):
    """The engine itself failed (generation loop died, device error, OOM of the batch)."""

    kind = "engine_error"


class CorruptModel(MlxRayError):
    """A model file failed its integrity check (hash, size or safetensors header)."""

    kind = "corrupt_model_error"


class ReadOnlyCache(MlxRayError):
    """The model cache cannot be written."""

    kind = "read_only_error"
