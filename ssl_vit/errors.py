"""The one exception type that reaches users as a one-line message (the CLI prints it without a traceback)."""


class SslVitError(Exception):
    """A problem with the user's input (file, key, recipe value): the message names it in one line."""
