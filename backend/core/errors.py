"""The one error type for mistakes a user can cause.

The UI shows its message; the API returns it as a 4xx JSON body. Anything else
that goes wrong is a bug: logged with its traceback and reported as a 500.
"""


class UserError(Exception):
    """A problem with the user's input or files, with a message meant for them."""

    headers: dict[str, str] | None = None  # extra HTTP headers for the API's answer (e.g. Retry-After)

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self):  # survive pickling across the backend process boundary
        return (UserError, (self.message, self.status))


class QueueFull(UserError):
    """The job queue holds as many jobs as the `queue_max_jobs` setting allows: try again later (HTTP 503)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, status=503)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}

    def __reduce__(self):
        return (QueueFull, (self.message, self.retry_after))


class JobInterrupted(Exception):
    """Raised inside a job when the user pressed Interrupt."""
