"""`python -m kubetune_cli` = `kubetune` (see app.py)."""

import sys

from .app import main

sys.exit(main())
