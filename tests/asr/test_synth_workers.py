"""Running a function in fresh interpreters."""

import pytest

from ebranchformer.asr.synth_workers import run_in_workers


def test_each_payload_runs_in_a_worker(tmp_path):
    targets = [str(tmp_path / name) for name in ("a", "b")]
    run_in_workers("os:mkdir", targets)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_failing_worker_raises_with_its_error(tmp_path):
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        run_in_workers("os:rmdir", [str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="target"):
        run_in_workers("no_colon", [1])
