"""``python -m bastion``: the ``bastion`` command."""

import sys

from bastion.proxy.control.cli import main

sys.exit(main())
