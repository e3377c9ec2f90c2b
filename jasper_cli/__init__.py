"""The `jasper` command line: one subcommand module per daemon or tool."""
