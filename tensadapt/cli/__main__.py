"""``python -m tensadapt.cli``: the same as the ``tensadapt`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())
