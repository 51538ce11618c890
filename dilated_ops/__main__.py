"""``python -m dilated_ops [demo|bench|inspect|plot] ...``: see :mod:`dilated_ops.cli`. With no
subcommand it runs the demo."""
from .cli import main

raise SystemExit(main())
