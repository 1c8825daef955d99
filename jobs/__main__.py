"""``python -m jobs ...`` — see ``jobs.core.cli``."""
from jobs.core.cli import main

raise SystemExit(main())
