"""The one error type for mistakes a user can cause.

The UI shows its message; the API returns it as a 4xx JSON body. Anything else
that goes wrong is a bug: logged with its traceback and reported as a 500.
"""


class UserError(Exception):
    """A problem with the user's input or files, with a message meant for them."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status

    def __reduce__(self):  # survive pickling across the backend process boundary
        return (UserError, (self.message, self.status))


class JobInterrupted(Exception):
    """Raised inside a job when the user pressed Interrupt."""
