"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing or corrupt file).

    Command-line entry points catch it, log its message on one line and exit
    with status 2; the message names the file or flag and says how to fix it.
    """

    exit_code = 2
