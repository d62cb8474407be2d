"""The command line: flags, help, error lines, progress."""
