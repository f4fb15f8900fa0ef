"""The one error type a user sees: a bad recipe, model path or input. The CLI prints it as one line
and exits with code 2; everything else is a bug and keeps its traceback."""


class CompressError(Exception):
    """A problem with the user's input, stated so that it says what to fix."""


EXIT_RUN_FAILED = 1  # a run that failed (a bug, a killed process): the exit code of the command line
EXIT_INPUT_ERROR = 2  # a CompressError: the one line says what to fix
