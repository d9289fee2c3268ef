"""Packaging patches: applied once by the project's set-up (scripts/bootstrap.sh), not at run time."""
