"""The project's error types: a problem with what the user gave us, not a bug.

Each one carries a message that names the offending key, file or value and says how to fix it.
Code raises these where it finds the problem and never catches them one by one: the command line
(`cli.main`) turns any of them into one `error: ...` line and exit status 2, without a traceback.
Anything else that escapes is a bug and keeps its traceback.

Each type also derives from the builtin a caller would expect (`ValueError`, `FileExistsError`),
so `except ValueError` in library code keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave (config, data, run directory, checkpoint, adapter) is wrong; the
    message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with a message that names the key and how to fix it."""


class DataError(UserError, ValueError):
    """A data file or data set that cannot be used as given; the message names the file."""


class RunDirError(UserError, FileExistsError):
    """A run directory that cannot be used: holds another run, is a file, is not writable, or is
    in use by another process."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from (damaged, another config, another model)."""


class AdapterError(UserError, ValueError):
    """An exported adapter directory that cannot be loaded (missing or damaged files)."""


class PlanError(UserError, ValueError):
    """A device plan the fleet cannot carry out (e.g. it does not fit a device's memory)."""
