"""The record of one run: the resolved recipe (`recipe.json`, `recipe.yaml`), `log.jsonl` (one object per logged
step), accelerate's experiment trackers (`train.log_with`: TensorBoard, W&B, MLflow, ...) and progress on stderr —
a tqdm bar on a terminal, else one plain line per logged step (SLURM logs, pipes). Files are the main process's."""
import json
import sys
from pathlib import Path

import yaml
from accelerate.utils import LoggerType, ProjectConfiguration
from tqdm import tqdm

from ssl_vit.atomic_io import atomic_write, write_json_atomic
from ssl_vit.errors import SslVitError

PROJECT = "ssl_vit"  # the trackers' project (TensorBoard: the folder under <out_dir>/tensorboard/)


def tracking_options(log_with: list, out_dir) -> dict:
    """`Accelerator(**tracking_options(...))`: the trackers of `train.log_with`, each checked to be one accelerate
    knows and can import; local tracker files go under <out_dir>/tensorboard/."""
    from accelerate.tracking import get_available_trackers

    known = [t.value for t in LoggerType if t != LoggerType.ALL]
    for name in log_with:
        if name not in known:
            raise SslVitError(f"train.log_with: unknown tracker {name!r} (accelerate knows: {', '.join(known)})")
        if LoggerType(name) not in get_available_trackers():
            raise SslVitError(f"train.log_with: {name!r} is not installed here (pip install {name})")
    out_dir = Path(out_dir)
    return {"log_with": list(log_with) or None,
            "project_config": ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard"))}


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested recipe as one level of `section.key` → number, string or bool (lists as JSON text), as trackers'
    hyperparameter tables take it."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


class RunLog:
    def __init__(self, accelerator, out_dir: Path, recipe: dict, total_steps: int, step: int, progress: bool,
                 desc: str):
        self.acc, self.total, self.desc = accelerator, total_steps, desc
        self.jsonl = self.bar = None
        self.plain = False
        accelerator.init_trackers(PROJECT, config=flat_config(recipe))
        if not accelerator.is_main_process:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "recipe.json", recipe)
        with atomic_write(out_dir / "recipe.yaml", "w") as f:
            yaml.safe_dump(json.loads(json.dumps(recipe)), f, sort_keys=False)  # tuples → lists
        self.jsonl = open(out_dir / "log.jsonl", "a")
        if progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
        self.plain = progress and self.bar is None

    def step(self, loss: float, images_per_s: float) -> None:
        """Every optimizer step: the progress bar, where there is one."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")

    def write(self, step: int, values: dict) -> None:
        """Every `train.log_every` steps: JSONL, trackers (numbers only, under `train/`), the plain progress line."""
        self.acc.log({f"train/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.plain:
            print(f"{self.desc} step {step}/{self.total} loss {values['loss']:.4f} "
                  f"{values.get('images_per_s', 0):.0f} img/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        # Not accelerator.end_training(): that also ends the process group, which the checkpoint and export need.
        for tracker in self.acc.trackers:
            tracker.finish()
        self.acc.trackers.clear()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
