"""Two CPU processes under torchrun (gloo): the autoencoder trains and its weights are written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 60  # a healthy 2-process smoke run takes about 10 s on 2 cores


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def torchrun(stage: str, data: Path, out: Path, log: Path) -> tuple[int, str]:
    """``torchrun --nproc_per_node 2 -m lsdm_aug.cli train <stage>``; kills what it started if it hangs."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "lsdm_aug.cli", "train", stage, "--recipe", "phantom-smoke",
               "--data", str(data), "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as stream:
        process = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stuck = descendants(process.pid)
            for pid in [process.pid, *stuck]:  # only the processes this test started
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            raise AssertionError(f"torchrun {stage} did not finish in {TIMEOUT_S} s (a rank is waiting for the "
                                 f"other):\n" + log.read_text()[-3000:]) from None
    return process.returncode, log.read_text()


def test_two_process_torchrun_trains_the_autoencoder(phantom_dataset, tmp_path):
    out = tmp_path / "models"
    code, output = torchrun("autoencoder", phantom_dataset, out, tmp_path / "torchrun.log")
    assert code == 0, output[-3000:]
    assert (out / "autoencoder.safetensors").stat().st_size > 0
    assert (out / "autoencoder_state.safetensors").is_file()


@pytest.mark.slow
def test_two_process_torchrun_trains_the_unet_and_the_classifiers(phantom_dataset, smoke_models, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    for name in ("autoencoder.safetensors", "autoencoder.json"):
        shutil.copy(smoke_models / name, out / name)
    for stage, written in (("diffusion", ["unet"]), ("classifiers", ["classifier_malignancy", "classifier_texture"])):
        code, output = torchrun(stage, phantom_dataset, out, tmp_path / f"{stage}.log")
        assert code == 0, output[-3000:]
        for name in written:
            assert (out / f"{name}.safetensors").stat().st_size > 0, name
