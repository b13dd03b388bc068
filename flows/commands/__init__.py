"""One module per `segflow` subcommand (see flows/cli.py)."""
