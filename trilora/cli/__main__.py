"""`python -m trilora.cli`, as `python -m trilora` (the single-file cli.py ran this way too)."""
import sys

from . import main

sys.exit(main())
