"""User-facing errors.

Every problem a user can fix (bad data, a wrong option, a broken run folder) is raised as a
`VaekitError` whose message is one line naming what is wrong and how to fix it. The CLI prints
that line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class VaekitError(Exception):
    """A problem with the user's input, stated in one line with the fix."""


class ConfigError(VaekitError):
    """An option or `config.json` value is unknown, missing, of the wrong type or out of range."""


class DataError(VaekitError):
    """A dataset cannot be found, read, or scored by the chosen likelihood."""


class RunError(VaekitError):
    """A run folder is missing, incomplete, locked, corrupt or from an incompatible config."""


class TrainingError(VaekitError):
    """Training cannot go on (for example, the loss became non-finite)."""


def record_for_launcher(message: str) -> None:
    """Under torchrun, leave a process's error in its error file, which torchrun's failure
    summary shows (the JSON of torch.distributed.elastic's ErrorHandler); else do nothing."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as handle:
                json.dump({"message": {"message": message, "extraInfo": {
                    "py_callstack": message, "timestamp": str(int(time.time()))}}}, handle)
        except OSError:
            pass  # the message was printed too; the summary is a convenience
