"""Data-parallel training for real: 2 CPU processes on gloo give the single-process update."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitsteer.updates import SteeringUpdate
from tiny import tiny_workspace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 14 pairs, batch 4: the last batch (2 pairs) has one pair per process
    return tiny_workspace(tmp_path_factory.mktemp("ddp"), 14)


def train_args(root: Path, out: Path, method: str, form: str) -> list[str]:
    return [sys.executable, "-m", "splitsteer", "train", "--model", str(root / "model"), "--data",
            str(root / "pairs.jsonl"), "--method", method, "--form", form, "--layer", "1", "--epochs", "2",
            "--batch-size", "4", "--seed", "3", "--out", str(out)]


@pytest.mark.parametrize(("method", "form"), [("split", "lora"), ("reps", "vector"), ("diffmean", "vector")])
def test_two_gloo_processes_match_one(setup: Path, method: str, form: str) -> None:
    single = setup / f"single-{method}"
    subprocess.run(train_args(setup, single, method, form), check=True, capture_output=True)
    parallel = setup / f"parallel-{method}"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(train_args(setup, parallel, method, form) + ["--distributed"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a, b = SteeringUpdate.load(single), SteeringUpdate.load(parallel)
    for name in a.params:
        torch.testing.assert_close(b.params[name], a.params[name], atol=1e-5, rtol=1e-4)
    assert b.meta["hyperparameters"] == a.meta["hyperparameters"]
    if method != "diffmean":
        single_log = (single / "train_log.csv").read_text().splitlines()
        parallel_log = (parallel / "train_log.csv").read_text().splitlines()
        assert len(single_log) == len(parallel_log) == 1 + 2 * 4
