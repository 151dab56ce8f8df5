"""``python -m pipeline.cli``: the ``aipipe`` command."""

import sys

from pipeline.cli.main import main

sys.exit(main())
