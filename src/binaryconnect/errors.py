"""Exceptions with messages meant for the user: the command line prints them as one line, no traceback."""


class BinaryConnectError(Exception):
    """Base class of the errors the command line reports as ``error: <message>``."""

    exit_code = 2


class ConfigError(BinaryConnectError, ValueError):
    """An invalid option or configuration: the message says what is wrong and what to do."""


class DataError(BinaryConnectError):
    """A dataset that is missing, corrupt or fails its checksum."""


class CheckpointError(BinaryConnectError):
    """A run directory, checkpoint or model file that is missing, truncated or inconsistent."""


class CudaGraphError(BinaryConnectError):
    """The training step could not be recorded as CUDA graphs (``--cuda-graph``): an operation in it that
    recording forbids (a read back to the host, a synchronisation, a new allocation on another stream ...)."""


class TrainingDiverged(BinaryConnectError):
    """The loss became NaN or Inf: training stopped before the optimizer step."""

    exit_code = 3


#: Written into the run directory of a run whose loss became NaN/Inf (epoch, step, loss, the message), removed
#: when the run is tried again. A repeated sweep does not resume such a run: from its last checkpoint, with
#: the same options and seed, it diverges again. (Here, not in checkpoint.py: ``report`` reads it without torch.)
DIVERGED_NAME = "diverged.json"


class TrainingInterrupted(BinaryConnectError):
    """SIGINT (Ctrl-C) or SIGTERM stopped training cleanly after a step, with a checkpoint written.

    The exit code is ``128 + signal number`` as a shell reports for a process ended by that signal:
    130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
