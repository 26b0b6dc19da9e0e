"""One exception type for everything a user can fix: the CLI prints its message on one line, no traceback."""


class TunelabError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""


class ConfigError(TunelabError):
    """A bad configuration value, key or file."""


class DataError(TunelabError):
    """A bad data file; the message names the file and line."""

    def __init__(self, path, line, message):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line
