"""One module per command area; each exposes register(app). kvcli/cli.py wires them and owns the exit codes."""
