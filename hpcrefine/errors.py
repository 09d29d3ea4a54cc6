"""The one exception type that reaches the user as a clear message and a non-zero exit."""


class InputError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""

    exit_code = 2
