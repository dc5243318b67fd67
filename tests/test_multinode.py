"""Two machines, simulated: two `accelerate launch --num_machines 2` invocations on 127.0.0.1 (gloo, CPU), one
process and two loader workers each, writing to one out_dir as they would on a shared filesystem. The README's
SLURM example is this command with the node's rank and the first node's address filled in."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_preemption import stop
from test_train import METHOD_ARGS, TINY, recipe_for

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_command(rank: int, port: int, shards: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--dynamo_backend", "no",
            "-m", "ssl_vit.train", "--recipe", recipe_for("mae"), "train.resume=auto",
            f"data.train={shards}", f"train.out_dir={out}", f"train.steps={STEPS}", "train.epochs=0",
            "data.batch_size=32", "train.audit_keys=true", *TINY, "data.num_workers=2", *METHOD_ARGS["mae"]]


def wait_all(procs, timeout: float) -> list[int | None]:
    """Exit statuses; stops waiting as soon as one fails (the other machine would wait for it until timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            return codes
        time.sleep(0.2)
    return [p.poll() for p in procs]


@pytest.mark.slow
def test_two_machines_train_on_disjoint_data_and_export(train_shards, tmp_path):
    out, port = tmp_path / "run", free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"machine{rank}.log" for rank in range(2)]
    machines = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as f:
                machines.append(subprocess.Popen(machine_command(rank, port, train_shards, out), env=env, stdout=f,
                                                 stderr=subprocess.STDOUT))
        codes = wait_all(machines, timeout=400)
    finally:
        for m in machines:
            stop(m)
    for code, log in zip(codes, logs):
        assert code == 0, log.read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert (out / "backbone.safetensors").is_file()
    audits = [(out / "audit" / f"rank{r}.jsonl").read_text().splitlines() for r in range(2)]
    keys = [[k for line in lines for k in json.loads(line)["keys"]] for lines in audits]
    assert [len(k) for k in keys] == [STEPS * 16, STEPS * 16]  # 16 per machine per step
    assert len(set(keys[0])) == len(keys[0]) and len(set(keys[1])) == len(keys[1])
    assert not set(keys[0]) & set(keys[1])
