"""``python -m ebranchformer.bench``: see :mod:`ebranchformer.bench.cli`."""

from .cli import main

raise SystemExit(main())
