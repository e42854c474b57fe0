"""The `llada` command: one small module per subcommand."""
