"""A main-only stage that outlasts the run's collective timeout: the other processes keep waiting and go on."""
import os
import socket
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, out_dir: str, results) -> None:
    import time
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", ACCELERATE_USE_CPU="true")
    # The run's own group gives up after 2 s, as NCCL's gives up after 10 minutes on a long main-only stage.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    from ssl_vit.pipelines.stages import StageRunner

    stages = StageRunner(Path(out_dir))
    done = Path(out_dir) / "slow.json"
    try:
        stages.run("slow", done, lambda: (time.sleep(6), done.write_text('{"ok": 1}')))
        results[rank] = "ok"
    except Exception as e:  # noqa: BLE001 - the test reports what each rank saw
        results[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_waiting_ranks_outlast_the_run_groups_timeout(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert dict(results) == {0: "ok", 1: "ok"}
    assert (tmp_path / "slow.json").read_text() == '{"ok": 1}'
