"""The one exception type that reaches users as a one-line message (the CLI prints it without a traceback)."""
import re


class SslVitError(Exception):
    """A problem with the user's input (file, key, recipe value): the message names it in one line."""


def load_error_detail(error: Exception, limit: int = 300) -> str:
    """The informative line of a `load_state_dict` error: torch's first line only says "Error(s) in loading ...",
    the next names the first key that did not fit."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0] if lines else ""
    return detail[:limit]


class BadSample(Exception):
    """A sample that cannot be used (no image, undecodable image); the reader skips and counts it. Defined here, the
    bottom layer, because the readers (data/) and the view transforms (transforms/) both raise it."""


SAMPLE_INFO = "ssl_vit.sample"  # the `info` key of an opened image that names its sample (for error messages)

_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")


def plain(error: Exception) -> str:
    """An error's message without Python object reprs (PIL names the BytesIO it could not read)."""
    return _OBJECT_REPR.sub("the image bytes", str(error)) or type(error).__name__
