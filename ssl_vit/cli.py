"""`ssl-vit <verb>`: thin; each verb lives in `ssl_vit/commands/<module>.py` with `register(subparsers)`.

The command modules are imported here, all of them, to build the parser; each defers its library imports (torch,
timm, accelerate, FAISS: about 3-7 s) into the function that runs the command, so `ssl-vit --help` and the `shards`
verbs answer without loading them. That is the one place the package defers imports of its own dependencies."""
import argparse
import sys

from ssl_vit import __version__
from ssl_vit.commands import compare, features, finetune, inspect_model, serve, shards, train
from ssl_vit.commands import eval as evaluate
from ssl_vit.errors import SslVitError

DESCRIPTION = ("ssl_vit: self-supervised pretraining of Vision Transformers (MAE, DINO, supervised baseline) on "
               "WebDataset shards, with k-NN / linear-probe / fine-tuning evaluation and retrieval indexes.")

# The command table, in the order of `--help`: each module defines register(subparsers), which sets a
# `func(args) -> int | None` default on its parsers.
COMMANDS = (shards, train, finetune, features, evaluate, compare, inspect_model, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-vit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ssl_vit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def one_line(message: str) -> str:
    """An error raised in a DataLoader worker arrives wrapped in the worker's traceback; keep the original message."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if "Original Traceback" in message and lines:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(("SslVitError", "ssl_vit.errors.SslVitError")) else last
    return "; ".join(lines)


def end_process_group() -> None:
    """Close the process group (a command run under `accelerate launch`) before the interpreter exits: left to
    interpreter shutdown, gloo's threads can abort the process ("terminate called without an active exception")
    after a run that succeeded."""
    dist = sys.modules.get("torch.distributed")  # never imported: no process group, and no torch import for it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SslVitError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        end_process_group()


if __name__ == "__main__":
    sys.exit(main())
