"""The ``kvplane`` command line (entry point :func:`kvplane.cli.main.main`)."""
