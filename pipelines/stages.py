"""The stages of a pipeline run in one process or under `accelerate launch`: each writes its result into the run
folder and is skipped when that result exists.

Under several processes the main process decides whether a stage is done (and tells the others, so that all take
the same branch: a collective stage run by some ranks only would hang). A stage that only writes files (shards,
labelled subsets, evaluations, the report) runs on the main process while the others wait; its error, if any, is
raised on every process, so none is left in a barrier. A collective stage (pretraining, feature extraction,
fine-tuning) runs on every process together.

The others wait in a collective of their own: a gloo group with a timeout of WAIT_TIMEOUT. A main-only stage can take
hours (writing ImageNet's shards), and the run's own group would give up long before: NCCL after 10 minutes by
default, gloo after 30.
"""
import json
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ssl_vit.errors import SslVitError

WAIT_TIMEOUT = timedelta(days=2)


class StageRunner:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.timings: dict[str, float] = {}
        # The process group `accelerate launch` set up (one process otherwise), with the device choice every
        # Accelerator of the run makes: the first state made is the one they all share.
        self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        self.wait_group = (dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
                           if self.state.num_processes > 1 else None)

    def run(self, name: str, done: Path, fn, *, together: bool = False):
        """Run `fn` unless `done` exists: on the main process (others wait), or on every process with `together`.
        Returns `done`'s JSON when it is a .json file."""
        if self.on_main(done.exists):
            self._say(f"[skip] {name}: done ({done})")
        else:
            self._say(f"[run ] {name}")
            t0 = time.perf_counter()
            if together:
                self._named(name, fn)
            else:
                self.on_main(lambda: self._named(name, fn))
            self.timings[name] = time.perf_counter() - t0
        return json.loads(done.read_text()) if done.suffix == ".json" else None

    def on_main(self, fn):
        """`fn()` on the main process; its result (or its SslVitError) on every process."""
        if self.state.num_processes == 1:
            return fn()
        outcome = [None, None]  # result, error message
        if self.state.is_main_process:
            try:
                outcome[0] = fn()
            except Exception as e:  # the other processes must not wait for it forever: they raise it too
                outcome[1] = str(e) if isinstance(e, SslVitError) else f"{type(e).__name__}: {e}"
                dist.broadcast_object_list(outcome, src=0, group=self.wait_group)
                raise
        dist.broadcast_object_list(outcome, src=0, group=self.wait_group)
        if outcome[1] is not None:
            raise SslVitError(outcome[1])
        return outcome[0]

    def _named(self, name: str, fn) -> None:
        try:
            fn()
        except SslVitError as e:
            raise SslVitError(f"stage '{name}' failed: {e} (finished stages are kept in {self.out_dir})") from None
        except Exception as e:
            raise SslVitError(f"stage '{name}' failed: {type(e).__name__}: {e} (finished stages are kept in "
                              f"{self.out_dir})") from e

    def _say(self, line: str) -> None:
        if self.state.is_main_process:
            print(line, flush=True)
