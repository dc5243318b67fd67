"""Writing a matplotlib figure as PNG, with a one-line error naming the file: every figure goes through `save_png`."""
from pathlib import Path

from ssl_vit.errors import SslVitError


def save_png(fig, png, **savefig) -> Path:
    """`fig` as a PNG at `png` (the parent folder created); `savefig`: matplotlib options such as dpi."""
    png = Path(png)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, format="png", **savefig)
    except OSError as e:
        raise SslVitError(f"cannot write {png}: {e.strerror or e}") from None
    return png
