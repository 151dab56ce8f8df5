"""The ``aipipe`` command (``main``), its subcommands and the demo (DESIGN A6). The top layer."""
