"""The medinv exception family.

Every error a user can cause or fix derives from :class:`MedinvError`. The CLI prints its
message as one line and exits with its ``exit_code``; anything else is a bug and keeps its
traceback.
"""


class MedinvError(Exception):
    """Base class of all medinv errors; the message is shown to the user as is."""

    exit_code = 1


class InputError(MedinvError):
    """A bad input file or argument; the message names the file and the problem."""

    exit_code = 2


class ConfigError(MedinvError):
    """An invalid or inconsistent configuration."""

    exit_code = 3


class ResourceError(MedinvError):
    """A missing resource: memory, a CUDA GPU, or data that has not been fetched."""

    exit_code = 4
