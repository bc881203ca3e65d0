"""``python -m qmoe ...``: the same as the ``qmoe`` command (also what ``torchrun -m qmoe`` runs)."""

import sys

from qmoe.cli import main

sys.exit(main())
