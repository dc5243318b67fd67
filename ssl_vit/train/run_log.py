"""Per-run logs on the main process: a JSONL file (one object per logged step) and TensorBoard scalars."""
import json
from pathlib import Path


class RunLog:
    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "log.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
