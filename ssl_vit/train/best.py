"""`train.keep_best`: the backbone of the monitored step with the best k-NN on `data.monitor`, exported instead of the
last step's. The main process holds one CPU copy of the backbone's state; every checkpoint carries it with its step
and score, so a resumed run (in another folder, on another number of processes) still knows it."""
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ssl_vit.errors import SslVitError

BEST_FILE = "best-backbone.safetensors"


class BestBackbone:
    def __init__(self):
        self.step: int | None = None
        self.score: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def consider(self, step: int, score: float, backbone: torch.nn.Module) -> None:
        """Keep `backbone`'s state when `score` beats the best so far (a tie keeps the earlier step)."""
        if self.score is None or score > self.score:
            self.step, self.score = step, score
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}

    def restore_into(self, backbone: torch.nn.Module) -> None:
        backbone.load_state_dict(self.state)

    def to_dict(self) -> dict | None:
        return None if self.step is None else {"step": self.step, "monitor_knn_top1": self.score}

    def write(self, folder: Path) -> None:
        """Into a checkpoint folder being written (main process)."""
        if self.state is not None:
            save_file({k: v.contiguous() for k, v in self.state.items()}, str(Path(folder) / BEST_FILE))

    @classmethod
    def read(cls, recorded: dict | None, folder: Path, load_state: bool) -> "BestBackbone":
        """The best a checkpoint recorded (`recorded`: its trainer state's "best"); the weights only if `load_state`."""
        best = cls()
        if recorded is None:
            return best
        best.step, best.score = int(recorded["step"]), float(recorded["monitor_knn_top1"])
        if load_state:
            path = Path(folder) / BEST_FILE
            if not path.is_file():
                raise SslVitError(f"checkpoint {folder} records its best monitored step ({best.step}) but lacks "
                                  f"{BEST_FILE}: it is incomplete")
            best.state = load_file(str(path))
        return best
