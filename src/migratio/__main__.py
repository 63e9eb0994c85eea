"""``python -m migratio``: the same as the ``migratio`` command."""

import sys

from migratio.cli import main

sys.exit(main())
