"""The `eightgen` command: options, subcommands, and the one-line errors."""
