"""The single-process DistContext (the multi-process path is exercised by test_ddp.py under torchrun)."""

from __future__ import annotations

import pytest
import torch

from ebranchformer.asr.distributed import setup_distributed


def test_single_process_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.device == torch.device("cpu")
    assert ctx.all_mean([1.0, 2.0]) == [1.0, 2.0] and ctx.all_min(3) == 3
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}] and ctx.broadcast_object("x") == "x"
    ctx.barrier()
    ctx.close()


def test_bad_settings(monkeypatch):
    with pytest.raises(ValueError, match="device"):
        setup_distributed("tpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        setup_distributed("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        setup_distributed("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        with pytest.raises(ValueError, match="CUDA"):
            setup_distributed("cuda")
