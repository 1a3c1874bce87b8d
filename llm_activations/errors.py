"""Error types that map to the command line's exit statuses (docs/FORMAT.md: exit 2 = usage/config)."""


class UsageError(Exception):
    """Bad option, configuration or input folder: printed as one line, exit status 2."""


class DatasetError(UsageError):
    """An activation dataset folder that readers and tools must refuse (no metadata, bad paths...)."""


class AcceleratorBusy(Exception):
    """The accelerator is held by another process (or a stale lock): printed as one line, exit 1."""

    MARK = "accelerator busy:"


class DataFault(Exception):
    """Data that must not be stored or delivered (e.g. activations that overflow the storage dtype):
    printed as one line, exit 1. MARK finds the line again inside a runner's wrapped worker error."""

    MARK = "data fault:"
