"""The version of ddpmkit (one place; the package and the checkpoints' manifest read it)."""

__version__ = "0.14.0"
