"""The one exception type that reaches users as a one-line message (the CLI prints it without a traceback)."""


class SslVitError(Exception):
    """A problem with the user's input (file, key, recipe value): the message names it in one line."""


def load_error_detail(error: Exception, limit: int = 300) -> str:
    """The informative line of a `load_state_dict` error: torch's first line only says "Error(s) in loading ...",
    the next names the first key that did not fit."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0] if lines else ""
    return detail[:limit]
