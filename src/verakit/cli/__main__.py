"""`python -m verakit.cli` (and `torchrun -m verakit.cli`): the `verakit` command."""

import sys

from . import main

sys.exit(main())
