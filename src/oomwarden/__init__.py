"""oomwarden: a programmable out-of-memory killer for Linux."""

__version__ = "0.1.0"
