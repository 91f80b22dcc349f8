"""``python -m lmpo ...`` = the ``lmpo`` command; what ``torchrun -m lmpo train cfg.yaml`` starts on every rank."""

import sys

from lmpo.cli import main

sys.exit(main())
