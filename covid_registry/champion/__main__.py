"""``python -m covid_registry.champion``: see :mod:`covid_registry.champion.cli`."""

import sys

from covid_registry.champion.cli import main

sys.exit(main())
