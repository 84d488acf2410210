"""The one error type of the kind tooling: a clear line for the user, never a traceback."""


class KindSetupError(RuntimeError):
    """Something the kind cluster needs is missing or failed; the message says what and what to do."""
