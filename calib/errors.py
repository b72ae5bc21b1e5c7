"""Errors that mean "the user's input is wrong": the CLI prints them without a
traceback and exits with status 2. Anything else is a bug (status 1)."""


class CalibInputError(Exception):
    """Bad input: a message that names the cause and the fix."""


class RecipeError(CalibInputError, ValueError):
    """A recipe that does not validate: the message names the file and field."""


class ModelNotFoundError(CalibInputError):
    """No model at the path or hub id given."""


class DatasetError(CalibInputError):
    """A dataset that cannot be found, read, or yields no calibration tokens."""
