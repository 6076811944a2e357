"""``python -m cenet``: the ``cenet`` command (:func:`cenet.cli.main.main`)."""

from cenet.cli.main import main

raise SystemExit(main())
