"""``python -m fastlora.benchmarks``: the same as ``fastlora bench``."""

import sys

from .cli import main

sys.exit(main())
