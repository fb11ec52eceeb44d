"""``python -m qrobust``: the ``qrobust`` command."""
from qrobust.cli import main

raise SystemExit(main())
