"""Run a function on JSON payloads in fresh Python interpreters, all at once.

Used by the corpus synthesis to spread work over CPU cores. Unlike a ``multiprocessing`` pool it
does not re-import the caller's ``__main__`` (stdin scripts and unguarded scripts work) and the
workers inherit no threads or library state from the caller.

Example:
    >>> from ebranchformer.asr.synth_workers import run_in_workers
    >>> run_in_workers("mypackage.jobs:render", [{"part": 0}, {"part": 1}])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["run_in_workers"]

_CHILD = ("import importlib, json, sys; module, _, name = sys.argv[1].partition(':'); "
          "getattr(importlib.import_module(module), name)(json.load(sys.stdin))")


def run_in_workers(target: str, payloads: list) -> None:
    """Call ``target`` (``"package.module:function"``) with each payload, each in its own interpreter.

    Payloads must be JSON-serialisable; the function gets one, decoded. Returns when all have
    finished; raises RuntimeError with the end of the worker's stderr when one fails.
    """
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    import ebranchformer

    src = str(Path(ebranchformer.__file__).resolve().parents[1])  # this very package, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in payloads]
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD, target], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=log, env=env, text=True) for log in logs]
        try:
            for proc, payload in zip(procs, payloads):
                with proc.stdin:
                    json.dump(payload, proc.stdin)
            for proc, log in zip(procs, logs):
                if proc.wait() != 0:
                    log.seek(0)
                    raise RuntimeError(f"worker {target} failed (exit code {proc.returncode}):\n"
                                       f"{log.read()[-3000:]}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
