"""The one exception type for expected, user-facing failures."""


class VoxCPMError(Exception):
    """A problem the user can fix: bad input, a broken checkpoint, a wrong option.

    The message is one line that says what is wrong, where (file, line, key) and how to fix it.
    The CLI prints it in red and exits with ``exit_code``; anything else is a bug and shows a traceback.
    """

    exit_code = 1
