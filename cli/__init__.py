"""The ``bbzo`` command line (installed as ``bbzo.cli``)."""
