"""Preemption while a `pipe:` reader stalls (a hung object store): the rank stops waiting for data, checkpoints the
steps it finished and exits 75 within the scheduler's grace period; the resumed run continues exactly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_vit.cli import main
from ssl_vit.data.epochs import EpochPlan, Layout
from ssl_vit.data.writer import write_shards
from ssl_vit.train.run_log import read_log
from test_compare_distributed import small_split
from test_train import METHOD_ARGS, TINY, recipe_for

EX_TEMPFAIL = 75         # the README's documented status for a preempted run
GRACE_SECONDS = 30       # torch elastic's default TORCH_ELASTIC_SHUTDOWN_TIMEOUT before its SIGKILL (README)
STEPS_BEFORE_STALL = 8   # 80 samples before the stalling shard, read through 16-sample windows: the fifth window
                         # is emitted once the sample after it has arrived, which never does
# A marker, part of the shard, then a stall the scheduler's SIGTERM does not end (a hung `aws s3 cp`, or a reader
# that blocks the signal): a read of a FIFO no one writes, which the test ends (`release`) when it is done.
STALLING = "pipe:sh -c \"trap '' TERM USR1; touch {marker}; head -c 20000 {shard}; exec cat {fifo}\""


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, bundled_train) -> tuple[Path, Path, Path]:
    """(index of three 40-sample shards, the same index with the shard read last in epoch 0 behind a stalling
    `pipe:` command, the marker that command touches)."""
    root = tmp_path_factory.mktemp("stall")
    index = write_shards(str(small_split(bundled_train, root / "train.tar.gz", 12)), str(root / "t"), max_count=40,
                         seed=0, workers=1, progress=False)
    counts = [e["samples"] for e in index["shards"]]
    assert counts == [40, 40, 40]
    last = EpochPlan(3, counts, 0, Layout(1, 1, 8, 1, 16, 15)).shard_order(0)[-1]  # the trainer's seed is 0
    marker, fifo = root / "stalled", root / "never"
    os.mkfifo(fifo)
    shards = [{**e, "name": STALLING.format(shard=root / e["name"], marker=marker, fifo=fifo) if i == last
               else str(root / e["name"])} for i, e in enumerate(index["shards"])]
    (root / "stalling-index.json").write_text(json.dumps({**index, "shards": shards}))
    return root / "t-index.json", root / "stalling-index.json", marker


def args(shards: Path, out: Path, workers: int, steps: int) -> list[str]:
    return ["pretrain", "--recipe", recipe_for("mae"), f"data.train={shards}", f"train.out_dir={out}",
            f"train.steps={steps}", "train.epochs=0", "data.batch_size=8", "data.shuffle_buffer=16",
            "train.resume=auto", *TINY, *METHOD_ARGS["mae"], f"data.num_workers={workers}"]


def release(marker: Path) -> None:
    """End every stalled read: open the FIFO for writing and close it (its readers see the end of the stream)."""
    try:
        os.close(os.open(marker.with_name("never"), os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left
        pass


def logged_steps(out: Path) -> list[int]:
    return [row["step"] for row in read_log(out / "log.jsonl")] if (out / "log.jsonl").is_file() else []


def losses(out: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in read_log(out / "log.jsonl")]


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_while_a_pipe_reader_stalls_checkpoints_and_exits_75(indexes, workers, tmp_path):
    local, stalling, marker = indexes
    marker.unlink(missing_ok=True)
    straight, out = tmp_path / "straight", tmp_path / "stalled"
    assert main(args(local, straight, workers, 12)) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ssl_vit.cli", *args(stalling, out, workers, 12)]
    with open(tmp_path / "run.log", "w+") as output:
        proc = subprocess.Popen(cmd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300  # only against a hang: the run reaches the stall at any speed
            while proc.poll() is None and time.monotonic() < deadline and not (
                    marker.exists() and logged_steps(out)[-1:] == [STEPS_BEFORE_STALL]):
                time.sleep(0.05)
            assert proc.poll() is None, "the run ended before the stall"
            # Every step that can be trained has been; the next one waits for bytes that never come.
            time.sleep(0.5)
            assert logged_steps(out)[-1] == STEPS_BEFORE_STALL and proc.poll() is None
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: the whole process group, the readers included
            status = proc.wait(timeout=GRACE_SECONDS)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
            release(marker)  # the stalled readers outlive the run
        output.seek(0)
        text = output.read()
    assert status == EX_TEMPFAIL and took < GRACE_SECONDS, text[-3000:]
    checkpoint = out / "checkpoints" / f"ckpt-{STEPS_BEFORE_STALL:08d}"
    assert f"preempted at step {STEPS_BEFORE_STALL}: checkpoint {checkpoint};" in text, text[-3000:]
    assert json.loads((checkpoint / "trainer.json").read_text())["step"] == STEPS_BEFORE_STALL

    # The batches the stalled step was waiting for are read again: resumed from local copies of the same shards,
    # the run logs the losses of one that never stalled.
    assert main(args(local, out, workers, 12)) == 0
    assert losses(out) == losses(straight) and len(losses(straight)) == 12


ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ssl_vit.cli"]
# Without workers a rank's batches go one at a time (with them, a transfer of several): rank 1 reads samples 56-111
# of the epoch; the stalling shard starts at its 25th, so its second window (and third batch) never comes.
RANK_STEPS_BEFORE_STALL = 2


@pytest.mark.slow
def test_two_ranks_stop_together_when_one_reader_stalls(indexes, tmp_path):
    """Rank 1's reader stalls while rank 0 has its batches and waits for rank 1 in the step's agreement: SIGTERM to
    both ranks, rank 1 gives up on its data, both checkpoint the same step and exit 75; the resumed pair logs the
    losses of a pair that never stalled."""
    local, stalling, marker = indexes
    marker.unlink(missing_ok=True)
    straight, out = tmp_path / "straight", tmp_path / "stalled"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = ["data.batch_size=16"]  # 8 per rank
    done = subprocess.run([*ACCELERATE, *args(local, straight, 0, 6), *two], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "run.log", "w+") as output:
        proc = subprocess.Popen([*ACCELERATE, *args(stalling, out, 0, 6), *two], env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and not (
                    marker.exists() and logged_steps(out)[-1:] == [RANK_STEPS_BEFORE_STALL]):
                time.sleep(0.05)
            time.sleep(0.5)
            assert proc.poll() is None and logged_steps(out)[-1:] == [RANK_STEPS_BEFORE_STALL]
            sent = time.monotonic()
            ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert len(ranks) == 2
            for rank in ranks:  # as SLURM signals every process of a job step
                os.kill(int(rank), signal.SIGTERM)
            proc.wait(timeout=GRACE_SECONDS)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
            release(marker)
        output.seek(0)
        text = output.read()
    # the launcher exits 1 when its ranks fail, whatever their status (README); their status is in its report
    assert proc.returncode == 1 and f"exitcode: {EX_TEMPFAIL}" in text and took < GRACE_SECONDS, text[-3000:]
    checkpoint = out / "checkpoints" / f"ckpt-{RANK_STEPS_BEFORE_STALL:08d}"
    assert f"preempted at step {RANK_STEPS_BEFORE_STALL}: checkpoint {checkpoint};" in text, text[-3000:]
    assert (checkpoint / "stream-rank0.json").is_file() and (checkpoint / "stream-rank1.json").is_file()

    resumed = subprocess.run([*ACCELERATE, *args(local, out, 0, 6), *two], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == losses(straight) and len(losses(straight)) == 6
