"""``python -m yeastarfs`` runs the command line."""

import sys

from yeastarfs.cli import main

sys.exit(main())
