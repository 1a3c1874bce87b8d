"""Error types that map to the command line's exit statuses (docs/FORMAT.md, "Exit statuses").

* UsageError (and DatasetError): the user named something wrong - an option, a configuration, a
  folder that is not a dataset, a bucket that does not exist. One line, exit status 2.
* Fault (and its kinds below): the data or the environment failed - a corrupt shard, storage that
  stopped answering, a busy accelerator. One line, exit status 1.
"""


class UsageError(Exception):
    """Bad option, configuration or input folder: printed as one line, exit status 2."""


class DatasetError(UsageError):
    """An activation dataset folder that readers and tools must refuse (no metadata, bad paths...)."""


class Fault(Exception):
    """A data or environment fault the user did not cause by a bad option: one line, exit status 1.

    MARK starts the message, so the launcher finds it again in the text of a worker's exception
    that a Beam runner re-raised wrapped in its own (errors.fault_line).
    """

    MARK = "fault:"

    def __str__(self) -> str:
        text = super().__str__()
        return text if text.startswith(self.MARK) else f"{self.MARK} {text}"


class CorruptData(Fault):
    """A file does not hold what its metadata says (sha256, size, missing): the data is damaged."""

    MARK = "corrupt data:"


class StorageUnavailable(Fault):
    """Remote storage stopped answering and the retry budget (fileio.RETRY_SECONDS) is spent."""

    MARK = "storage unavailable:"


class AcceleratorBusy(Fault):
    """The accelerator is held by another process (or a stale lock): printed as one line, exit 1."""

    MARK = "accelerator busy:"


class DataFault(Fault):
    """Data that must not be stored or delivered (e.g. activations that overflow the storage dtype):
    printed as one line, exit 1. MARK finds the line again inside a runner's wrapped worker error."""

    MARK = "data fault:"


def fault_line(exc: BaseException) -> str | None:
    """The one line of a Fault inside exc (itself, its causes, or the text a runner wrapped it in),
    without the step name a Beam runner appends when it re-raises a worker's exception."""
    seen = set()
    e, line = exc, None
    while e is not None and id(e) not in seen and line is None:
        if isinstance(e, Fault):
            line = str(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if line is None:
        text = str(exc)
        marks = [at for at in (text.find(kind.MARK) for kind in (CorruptData, StorageUnavailable, AcceleratorBusy,
                                                                 DataFault)) if at >= 0]
        if not marks:
            return None
        line = text[marks[0]:]
    return line.splitlines()[0].split(" [while running")[0]
