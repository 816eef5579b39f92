"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class SegadaptError(Exception):
    """An error caused by the user's input (data, config, checkpoint), not a bug."""


class ConfigError(SegadaptError):
    pass


class DatasetError(SegadaptError):
    pass


class CheckpointError(SegadaptError):
    pass


class TrainingError(SegadaptError):
    pass


class OutputError(SegadaptError):
    """A file could not be written (read-only or full disk, a folder in the way, ...)."""


class PeerError(SegadaptError):
    """Another rank's error, relayed to this rank (distributed runs): the rank that met it
    reports it; this one only stops, quietly."""


class SegadaptWarning(UserWarning):
    """Something the user should know about their input, that does not stop the command; the
    CLI prints it as one line (`segadapt <command>: warning: ...`)."""


def write_error(path, error: OSError) -> OutputError:
    """`cannot write <path>: <cause>` for an OSError met while writing `path`."""
    cause = error.strerror or str(error) or type(error).__name__
    return OutputError(f"cannot write {path}: {cause}")
