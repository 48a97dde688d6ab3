import sys

from spurfast.bench.command import main

sys.exit(main())
