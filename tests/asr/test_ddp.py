"""DistributedDataParallel training under torchrun on the CPU (gloo): the ranks stay identical, and two
processes give what one process gives on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ebranchformer.asr.checkpoint import list_checkpoints
from ebranchformer.asr.model_dir import load_weights
from ebranchformer.asr.train import train
from tests.asr.ctc_corpus import single_thread, tiny_model_config, tiny_train_config, write_tone_corpus

# Runs the real entry point (main) under torchrun; each rank also dumps its final weights and losses.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ebranchformer.asr.train as T
    from ebranchformer.asr.model_dir import save_weights

    dump = sys.argv[1]
    run = T.Trainer.run

    def run_and_dump(self):
        result = run(self)
        save_weights(self.model.state_dict(), f"{dump}/rank{self.ctx.rank}.safetensors")
        with open(f"{dump}/losses{self.ctx.rank}.json", "w") as f:
            json.dump({"losses": result.losses, "world": self.ctx.world_size}, f)
        return result

    T.Trainer.run = run_and_dump
    sys.exit(T.main(sys.argv[2:]))
    """
)


def _config(tmp_path, out):
    # Equal manifest durations: every global batch holds 4 utterances whether packed in groups of 1 or 2, so
    # the 2-process run (split_batches packs groups of 2) sees exactly the single process's batches.
    # Features without centring (no reflection padding): a row's features then do not depend on how far the
    # batch is padded after it (with ESPnet's centred STFT, the longest row of each rank's slice would get its
    # own end reflected instead of zeros, a 1e-3 difference). Adam's eps is raised so that coordinates with a
    # gradient of ~0 (pure rounding noise, e.g. in linear_pos) are not normalised into lr-sized differences.
    train_m, valid_m = write_tone_corpus(tmp_path / "data", n_train=32, n_valid=4, fixed_duration=0.5)
    model = tiny_model_config()
    model["features"] = {**model["features"], "center": False}
    return tiny_train_config(
        out,
        train_m,
        valid_m,
        model=model,
        data={"max_frames": 200.0, "num_buckets": 2},
        optim={"total_steps": 8, "eps": 1e-4},
        checkpoint={"every_steps": 4, "average_best": 0},
    )


def test_two_gloo_ranks_match_a_single_process(tmp_path):
    cfg = _config(tmp_path, tmp_path / "ddp")
    config_path = tmp_path / "train.yaml"
    config_path.write_text(cfg.to_yaml())
    dump = tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "run_ddp.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(dump),
        str(config_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 8 steps" in proc.stdout  # printed by rank 0 only
    assert proc.stdout.count("done:") == 1

    ranks = [load_weights(dump / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP keeps the replicas identical
    runs = [json.loads((dump / f"losses{r}.json").read_text()) for r in (0, 1)]
    assert runs[0]["world"] == 2 and runs[0]["losses"] == runs[1]["losses"]  # losses are averaged over ranks

    with single_thread():
        single = train(cfg.replace(output_dir=str(tmp_path / "single")))
    ddp_losses = {int(k): v for k, v in runs[0]["losses"].items()}
    assert sorted(ddp_losses) == sorted(single.losses) == list(range(1, 9))
    for step, loss in single.losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    ref = load_weights(tmp_path / "single" / "model" / "model.safetensors")
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")

    # rank 0 alone wrote the run's files, once
    out = tmp_path / "ddp"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004", "step_00000008"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [4, 8]
    assert len([r for r in records if r["kind"] == "final"]) == 1
    final = load_weights(out / "model" / "model.safetensors")
    assert all(torch.equal(final[k], ranks[0][k]) for k in final)  # average_best=0: the last weights
