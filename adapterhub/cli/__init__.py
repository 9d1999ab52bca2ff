"""The `ah` command line: thin commands over `adapterhub.Registry`."""
