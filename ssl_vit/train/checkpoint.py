"""Atomic checkpoints on top of `accelerator.save_state`.

Layout under `<out_dir>/checkpoints/`: `ckpt-<step>/` folders and a `latest` pointer file. A save writes
`ckpt-<step>.tmp/` (accelerate's model/optimizer/RNG files, plus `trainer.json` and one `stream-rank<r>.json` per
rank), fsyncs it, renames it to `ckpt-<step>/`, then atomically replaces `latest`. A crash at any instant leaves the
previous checkpoint loadable; stale `.tmp` folders are ignored and removed by the next save.
"""
import json
import shutil
import subprocess
from pathlib import Path

from ssl_vit import __version__
from ssl_vit.atomic_io import fsync_tree, replace_dir, write_json_atomic, write_text_atomic
from ssl_vit.errors import SslVitError

POINTER = "latest"


def code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def save_checkpoint(accelerator, root: Path, step: int, trainer_state: dict, stream_state: dict,
                    keep: int = 2, write_main=None) -> Path:
    """Collective: every process calls it. `write_main(folder)`: what the main process adds to the checkpoint.
    Returns the final folder."""
    root = Path(root)
    final, tmp = root / f"ckpt-{step:08d}", root / f"ckpt-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    write_json_atomic(tmp / f"stream-rank{accelerator.process_index}.json", stream_state)
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer.json", trainer_state)
        if write_main is not None:
            write_main(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)
        replace_dir(tmp, final)
        write_text_atomic(root / POINTER, final.name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("ckpt-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """`resume`: '' → None; 'auto' → the latest checkpoint in out_dir or None; else that folder (must exist)."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / "trainer.json").is_file():
            raise SslVitError(f"not a checkpoint folder (no trainer.json): {path}")
        return path
    pointer = Path(out_dir) / "checkpoints" / POINTER
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer.json").is_file():
        raise SslVitError(f"checkpoint pointer {pointer} names a missing checkpoint: {path}")
    return path


def read_checkpoint_meta(path: Path) -> tuple[dict, list[dict]]:
    """The trainer state and every rank's stream state (a resume on another layout re-splits all of them)."""
    trainer = json.loads((path / "trainer.json").read_text())
    streams = []
    for rank in range(int(trainer["world_size"])):
        stream_file = path / f"stream-rank{rank}.json"
        if not stream_file.is_file():
            raise SslVitError(f"checkpoint {path} lacks {stream_file.name}: it was written by "
                              f"{trainer['world_size']} processes and is incomplete")
        streams.append(json.loads(stream_file.read_text()))
    return trainer, streams


# Recipe keys that shape the model and optimizer state a checkpoint holds.
ARCHITECTURE_KEYS = ("method", "model.name", "model.img_size", "model.patch_size", "model.depth", "model.embed_dim",
                     "model.num_heads", "data.num_classes", "mae.decoder_depth", "mae.decoder_dim",
                     "mae.decoder_heads", "dino.out_dim", "dino.hidden_dim", "dino.bottleneck_dim",
                     "dino.use_bn_in_head", "dino.norm_last_layer", "model.kwargs")
# Keys added after checkpoints were written without them: such a checkpoint had the value given here.
ADDED_LATER = {"model.kwargs": {}}


def architecture_differences(stored: dict, current: dict) -> list[str]:
    """'model.embed_dim 64 in the checkpoint, 96 in this recipe' for each architecture key that differs."""
    def value(recipe: dict, key: str):
        section, _, name = key.partition(".")
        if not name:
            return recipe.get(section)
        return recipe.get(section, {}).get(name, ADDED_LATER.get(key))

    return [f"{key} {value(stored, key)!r} in the checkpoint, {value(current, key)!r} in this recipe"
            for key in ARCHITECTURE_KEYS if value(stored, key) != value(current, key)]
