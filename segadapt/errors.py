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
