"""The project's own error types: input the user can fix, reported as one line without a traceback.

`train.py`, `eval.py` and the command-line tools print these as `error: <message>` and exit 1;
any other exception is a bug and keeps its traceback. Each subclasses ValueError, so code that
validates its arguments stays usable from plain Python.
"""

from __future__ import annotations


class AnomalyError(ValueError):
    """Bad user input; the message is one line that names the file or key and what is wrong."""


class DatasetError(AnomalyError):
    """A dataset (images, masks, textures) that cannot be used as it is."""


class ConfigError(AnomalyError):
    """A configuration value outside its range, or settings that do not fit together."""


class CheckpointError(AnomalyError):
    """A checkpoint that is missing, unreadable or not written by this project."""


class RunFolderError(AnomalyError):
    """A run folder that holds another run's results or settings, or cannot be written."""


class NonFiniteError(AnomalyError):
    """A loss, weight or score that is NaN or infinite: the run stops instead of going on."""
