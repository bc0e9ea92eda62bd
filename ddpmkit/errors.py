"""Errors a user can cause: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class DdpmkitError(Exception):
    """Base of every error caused by user input (config, paths, data, checkpoints, plugin names)."""


class ConfigError(DdpmkitError):
    """A config file or override that cannot be read or does not validate."""


class PluginError(DdpmkitError):
    """An unknown, ambiguous or broken plugin component was asked for."""


class DataError(DdpmkitError):
    """A dataset that cannot be found, downloaded or read."""


class CheckpointError(DdpmkitError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible with the config."""
