"""Checkpoints: a SIGKILL in the middle of a write leaves the previous checkpoint loadable, weights_only
loading of the training state, RNG state round trips, averaging, listing and deletion."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from ebranchformer.asr.atomic import is_temp_name, remove_stale_temps
from ebranchformer.asr.checkpoint import (
    average_checkpoints,
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_checkpoints,
    restore_rng_state,
    save_checkpoint,
)

_WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from ebranchformer.asr import checkpoint as ck

    folder = sys.argv[1]
    ck.save_checkpoint(folder, 1, {"w": torch.ones(4)}, {"step": 1}, {"step": 1})
    real_save = torch.save

    def stalled_save(obj, f, *args, **kwargs):  # writes half the training state, then hangs
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        open(os.path.join(folder, "READY"), "w").close()
        time.sleep(120)

    torch.save = stalled_save
    ck.save_checkpoint(folder, 2, {"w": torch.full((4,), 2.0)}, {"step": 2}, {"step": 2})
    """
)


def test_sigkill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "ckpts"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "READY").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never reached the middle of its second save"
            time.sleep(0.05)
        temps = [p for p in folder.iterdir() if is_temp_name(p.name)]
        assert len(temps) == 1 and (temps[0] / "state.pt").is_file()  # killed inside the write
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000001"]
    latest = latest_checkpoint(folder)
    weights, state, meta = load_checkpoint(latest)
    assert torch.equal(weights["w"], torch.ones(4)) and state == {"step": 1} and meta == {"step": 1}
    assert not (folder / "step_00000002").exists()
    assert len(remove_stale_temps(folder)) == 1 and not any(is_temp_name(p.name) for p in folder.iterdir())
    save_checkpoint(folder, 2, {"w": torch.full((4,), 2.0)}, {"step": 2}, {"step": 2})  # a later save works
    assert checkpoint_step(latest_checkpoint(folder)) == 2


def test_training_state_loads_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "rng": [capture_rng_state()],
        "step": 1,
        "scaler": torch.amp.GradScaler("cpu", enabled=True).state_dict(),
    }
    del sched
    path = save_checkpoint(tmp_path, 1, model.state_dict(), state, {"step": 1})
    weights, back, _ = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert torch.equal(weights["weight"], model.weight)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_state_with_arbitrary_objects_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"w": torch.ones(1)}, {"fn": np.random.default_rng(0)}, {"step": 3})
    with pytest.raises(ValueError, match=r"state\.pt"):
        load_checkpoint(path)


def test_rng_state_round_trip():
    restore_rng_state(capture_rng_state())  # a no-op round trip keeps working
    saved = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3), torch.randn(2))
    random.random(), np.random.rand(), torch.rand(5)
    restore_rng_state(saved)
    again = (random.random(), np.random.rand(), torch.rand(3), torch.randn(2))
    assert first[:2] == again[:2]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_average_checkpoints(tmp_path):
    a = save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}, {}, {})
    b = save_checkpoint(tmp_path, 2, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}, {}, {})
    avg = average_checkpoints([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and avg["w"].dtype == torch.float32
    assert int(avg["n"]) == 7  # integer tensors: the last checkpoint's
    c = save_checkpoint(tmp_path, 3, {"v": torch.ones(2)}, {}, {})
    with pytest.raises(ValueError, match="other tensors"):
        average_checkpoints([a, c])
    with pytest.raises(ValueError, match="at least one"):
        average_checkpoints([])


def test_listing_ordering_and_removal(tmp_path):
    for step in (10, 2, 100000000):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, {}, {"step": step})
    (tmp_path / "step_00000005").mkdir()  # incomplete: no files
    (tmp_path / "notes").mkdir()
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 10, 100000000]
    assert checkpoint_step(tmp_path / "step_12") is None and checkpoint_step("x/step_00000012") == 12
    remove_checkpoints([tmp_path / "step_00000010"])
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 100000000]
    with pytest.raises(ValueError, match="not a checkpoint"):
        remove_checkpoints([tmp_path / "notes"])
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {}, {}, {})
    assert latest_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "meta.json"])
def test_damaged_checkpoint_file_is_named(tmp_path, name):
    path = save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"step": 1}, {"step": 1})
    (path / name).write_bytes(b"\x00damaged")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_checkpoint(path)
