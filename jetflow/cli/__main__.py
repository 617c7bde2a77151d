"""``python -m jetflow.cli``: how ``jetflow up`` starts its services."""

import sys

from jetflow.cli.main import main

sys.exit(main())
