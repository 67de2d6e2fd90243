"""Errors a user can act on: the CLI prints their one-line message, never a traceback."""


class AceError(Exception):
    """A problem with the user's input or setup; the message names the file, row or field."""


class DataError(AceError):
    """Input data is missing, unreadable, or fails validation beyond the allowed share."""
