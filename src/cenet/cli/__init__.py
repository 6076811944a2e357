"""The ``cenet`` command line (also ``python -m cenet``): ``cenet train``, ``eval``,
``analyze``, ``compare``, ``models``, ``configs``, ``info``. The only part of cenet that
prints."""
