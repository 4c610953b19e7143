"""``python -m edgeft`` (also the entry point for ``torchrun -m edgeft``)."""

import sys

from .cli import main

sys.exit(main())
