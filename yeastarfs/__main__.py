"""``python -m yeastarfs`` runs the command line."""

import sys

from yeastarfs.app.cli import main

sys.exit(main())
