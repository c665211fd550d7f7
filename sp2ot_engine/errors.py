"""Exceptions shared across the engine."""


class Cancelled(RuntimeError):
    """Raised by a long-running fit when its ``should_stop`` callback returns True."""
