"""Writing a matplotlib figure as PNG, with a one-line error naming the file."""
from pathlib import Path

from ssl_vit.errors import SslVitError


def save_png(fig, png) -> Path:
    png = Path(png)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, format="png")
    except OSError as e:
        raise SslVitError(f"cannot write {png}: {e.strerror or e}") from None
    return png
