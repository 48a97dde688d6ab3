"""``python -m spurfast``: the same as the ``spurfast`` command."""
import sys

from spurfast.cli import main

sys.exit(main())
