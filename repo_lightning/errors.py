"""The errors a user can fix: the command line prints their message as one ``error: ...`` line (exit code 2).

Anything else is a bug or an environment failure and keeps its traceback. Each class subclasses the built-in
exception that code and tests already expect (``ValueError``, ``FileNotFoundError``), so raising one of these
instead changes what the user sees, not what callers catch.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A config value, data file or model folder given by the user is wrong; the message says which and why."""


class ConfigError(UserInputError):
    """A config value is out of range or inconsistent; the message names the key (``model.init_args.actor_lr``)."""


class DataError(UserInputError):
    """A data source cannot be read or a row breaks the data contract; the message names the file, row and field."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file, folder or model named in the config does not exist or cannot be loaded."""


class NonFiniteError(UserInputError):
    """A NaN or infinite value in a model's weights, scores, losses or gradients; the message names the first one."""
