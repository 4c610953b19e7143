"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class EdgeftError(Exception):
    """A problem with the user's input or environment that a message can explain in one line."""
