"""``python -m shardrec``: see `shardrec.cli`."""

from shardrec.cli import main

raise SystemExit(main())
