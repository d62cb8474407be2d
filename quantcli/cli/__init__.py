"""The command line: the Typer app, one module per concern, and the error boundary."""
