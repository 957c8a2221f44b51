"""`python -m tunesmith ...`, also as a launcher target: `accelerate launch -m tunesmith train ...`."""

import sys

from tunesmith.cli import main

sys.exit(main())
