"""One module per ``hawqc`` subcommand (see :mod:`hawqc.cli`)."""
