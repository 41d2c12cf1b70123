"""What an artifact that training reuses from its ``output_dir`` was built from.

Training builds the tokenizer and the feature statistics once and reuses them when it runs again in the same
``output_dir`` (a resumed run, or a run restarted before its first checkpoint). Each is stored with a small JSON
record of its inputs; a later run whose config asks for something else stops with a ``ValueError`` instead of
silently training on the old tokenizer or statistics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ebranchformer.asr.atomic import atomic_write

__all__ = ["check_source", "record_source"]

logger = logging.getLogger(__name__)


def record_source(path: str | Path, source: dict[str, Any]) -> None:
    """Store ``source`` (JSON-serialisable) as the record of what the artifact next to ``path`` was built from."""
    atomic_write(path, json.dumps(source, indent=2, sort_keys=True) + "\n")


def check_source(
    path: str | Path, source: dict[str, Any], what: str, artifact: str | Path, *, warn_only: tuple[str, ...] = ()
) -> None:
    """Raise ``ValueError`` if the record at ``path`` differs from ``source``, naming the settings that differ.

    ``what`` names the artifact in messages (e.g. ``"tokenizer"``), ``artifact`` is the file or directory to remove
    to rebuild it. Keys in ``warn_only`` (e.g. the training manifest's path, which moves with the data) only log a
    warning when they differ. A missing record (an artifact written before records existed) is accepted with a
    warning.
    """
    path = Path(path)
    if not path.is_file():
        logger.warning("%s %s has no record of what it was built from (%s); reusing it unchecked", what,
                       artifact, path.name)  # fmt: skip
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    # compare through JSON so that tuples and lists, ints and floats read back as written
    current = json.loads(json.dumps(source))
    keys = [k for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    diffs = {k: f"{k}: built with {recorded.get(k)!r}, now {current.get(k)!r}" for k in keys}
    for k in keys:
        if k in warn_only:
            logger.warning("reusing the %s in %s, built with a different %s", what, artifact, diffs[k])
    errors = [diffs[k] for k in keys if k not in warn_only]
    if errors:
        raise ValueError(
            f"the {what} in {str(artifact)!r} was built from other settings than this config's ("
            + "; ".join(errors)
            + f"); remove {str(artifact)!r} to rebuild it, or choose another output_dir"
        )
