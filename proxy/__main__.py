"""``python -m bastion`` is the ``bastion`` command."""

import sys

from .control.cli import main

sys.exit(main())
