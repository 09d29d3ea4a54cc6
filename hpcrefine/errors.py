"""The one exception type that reaches the user as a clear message and a non-zero exit."""


class InputError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""

    exit_code = 2


class Interrupted(Exception):
    """SIGUSR1 or SIGTERM: every rank stopped after the step in flight and the master wrote a
    checkpoint; the run continues with `--resume` (or `--restart CHECKPOINT`)."""

    exit_code = 75
