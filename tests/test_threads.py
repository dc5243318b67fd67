"""Intra-op threads: the cores the loader's workers leave, unless OMP_NUM_THREADS or train.threads says otherwise;
the choice is set, and the trainer logs it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_vit.cli import main
from ssl_vit.config import load_recipe
from ssl_vit.errors import SslVitError
from ssl_vit.threads import choose_threads, use_threads
from ssl_vit.train.run_log import read_log

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize("cores,workers,local,expected", [(8, 2, 1, 6), (2, 1, 1, 1), (2, 4, 1, 1), (16, 2, 2, 6)])
def test_cores_left_after_the_workers(no_omp, cores, workers, local, expected):
    choice = choose_threads(workers, cores=cores, local_processes=local)
    assert choice == {"threads": expected, "source": "cores left after the loader's workers", "cores": cores,
                      "workers": workers}


def test_local_world_size_shares_the_cores(no_omp, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_threads(1, cores=16)["threads"] == 3


def test_the_user_and_the_recipe_win(no_omp, monkeypatch):
    assert choose_threads(2, requested=5, cores=8)["threads"] == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(2, requested=5, cores=8) == {"threads": 3, "source": "OMP_NUM_THREADS", "cores": 8,
                                                       "workers": 2}


@pytest.mark.parametrize("env", ["x", "0"])
def test_bad_omp_num_threads_fails_in_one_line(no_omp, monkeypatch, env):
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    with pytest.raises(SslVitError, match=f"OMP_NUM_THREADS='{env}' is not a number of threads >= 1"):
        choose_threads(1)


def test_recipe_key_is_checked():
    with pytest.raises(SslVitError, match="train.threads: must be ≥ 0"):
        load_recipe(None, ["train.threads=-1", "train.steps=1"])


def test_use_threads_sets_torch(no_omp):
    before = torch.get_num_threads()
    try:
        assert use_threads(0, requested=2)["threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def trainer_args(out, workers: int) -> list[str]:
    return ["pretrain", "--recipe", str(ROOT / "recipes" / "mae_vit_tiny_cifar10.yaml"), f"train.out_dir={out}",
            "train.steps=2", "train.epochs=0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
            "mae.decoder_depth=1", "mae.decoder_dim=32", "mae.decoder_heads=2", "train.progress=false",
            "train.log_every=1", f"data.num_workers={workers}", "data.batch_size=16", "train.log_with=[]"]


def test_trainer_logs_its_threads(train_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    assert main([*trainer_args(out, 0), f"data.train={train_shards}"]) == 0
    assert [row["threads"] for row in read_log(out / "log.jsonl")] == [1, 1]


@pytest.mark.parametrize("workers", [0, 1])
def test_trainer_without_omp_num_threads_takes_the_cores_its_workers_leave(train_shards, tmp_path, workers):
    """The default rule itself, in a fresh process: no OMP_NUM_THREADS (the suite sets it), no train.threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    code = ("import sys, torch; from ssl_vit.cli import main; code = main(sys.argv[1:]); "
            "print('torch threads', torch.get_num_threads()); sys.exit(code)")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", code, *trainer_args(out, workers), f"data.train={train_shards}"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = max(1, len(os.sched_getaffinity(0)) - workers)
    assert [row["threads"] for row in read_log(out / "log.jsonl")] == [expected, expected]
    assert f"torch threads {expected}" in result.stdout
