"""``python -m vmdelta_core`` runs the command line."""

from vmdelta_core.cli import run

run()
