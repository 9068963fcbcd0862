"""The one exception type users see.

A :class:`KcdError` carries a one-line message that says what is wrong and how to fix it.
The CLI prints it alone (no traceback) and exits with status 2.
"""


class KcdError(ValueError):
    """A user-facing error: bad input, bad config, a missing or wrong file."""
