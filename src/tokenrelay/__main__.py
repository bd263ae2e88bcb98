"""``python -m tokenrelay`` is the ``tokenrelay`` command."""

import sys

from .server.cli import main

sys.exit(main())
