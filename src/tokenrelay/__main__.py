"""``python -m tokenrelay`` is the ``tokenrelay`` command."""

import sys

from ._cli import main

sys.exit(main())
