"""The command line's error for mistakes of the user's."""


class CLIError(Exception):
    """A bad argument, path or file content: reported in one line, exit code 2."""
