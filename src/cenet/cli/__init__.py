"""The ``cenet`` command line: ``cenet train``, ``cenet eval``, ``cenet models``,
``cenet configs``. The only part of cenet that prints."""
