"""The one error type a user sees: a bad recipe, model path or input. The CLI prints it as one line
and exits with code 2; everything else is a bug and keeps its traceback."""


class CompressError(Exception):
    """A problem with the user's input, stated so that it says what to fix."""
