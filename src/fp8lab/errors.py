"""The one exception type users see."""


class FP8LabError(Exception):
    """A mistake in the user's input or environment.

    The message is one line that names the file, key or value at fault and says what to do.
    The CLI prints it without a traceback and exits with `exit_code`; library callers can catch it.
    """

    exit_code = 2
    prefix = "error"
