"""`ssl-vit <verb>`: thin; each verb lives in `ssl_vit/commands/<module>.py` with `register(subparsers)`."""
import argparse
import importlib
import sys

from ssl_vit import __version__
from ssl_vit.errors import SslVitError

# Each module defines register(subparsers) and sets a `func(args) -> int | None` default.
COMMAND_MODULES = ("shards", "train", "features", "eval", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-vit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"ssl_vit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"ssl_vit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"ssl_vit.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SslVitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
