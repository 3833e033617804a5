"""Errors meant for the user: one clear line, no traceback."""


class UserError(Exception):
    """Bad input or a missing/corrupt file; the message says what and where."""


class GenerationInterrupted(Exception):
    """The user asked to stop; raised between denoising steps."""
