"""Errors a user can fix. The CLI prints them as one line and exits non-zero (2)."""


class UserError(Exception):
    """Bad input: the message names the file, field or flag, and the fix."""


class ConfigError(UserError):
    """A config key, type or combination is wrong."""


class DataError(UserError):
    """An input file is missing, empty or not in the expected format."""


class VerificationError(UserError):
    """An export does not reproduce the source model; nothing was written."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss kept spiking); the last complete checkpoint is intact."""
