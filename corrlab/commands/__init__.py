"""CLI subcommands: each module here defines ``register(subparsers)``; :mod:`corrlab.cli` discovers them."""
