"""The one exception type a user can cause.

Every problem a user can fix (a bad path, a corrupt slide, a missing mpp, a bag with no tiles, ...)
raises :class:`MiniKDError` with a message that says what went wrong and how to fix it. The CLI prints
that message on one line and exits with status 2; library callers can catch one type.
"""


class MiniKDError(Exception):
    """A problem with the user's input; the message says what and how to fix it."""
