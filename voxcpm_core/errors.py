"""The one exception type for expected, user-facing failures."""


class VoxCPMError(Exception):
    """A problem the user can fix: bad input, a broken checkpoint, a wrong option.

    The message is one line that says what is wrong, where (file, line, key) and how to fix it, in the
    engine's terms: parameters of the Python API and config keys. When one parameter fixes it, ``param``
    names it and ``value`` is a value that would do (if there is one), so a front end can say it in its
    own words: the CLI turns ``param="device", value="cpu"`` into ``--device cpu``.
    The CLI prints it in red and exits with ``exit_code``; anything else is a bug and shows a traceback.
    """

    exit_code = 1

    def __init__(self, message: str, *, param: str | None = None, value: str | None = None):
        super().__init__(message)
        self.param, self.value = param, value
