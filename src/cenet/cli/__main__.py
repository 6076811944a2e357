"""``python -m cenet.cli``: the ``cenet`` command."""

from cenet.cli.main import main

raise SystemExit(main())
