"""Exceptions that carry distbp's exit-code contract, and the one way to print an error as a line.

`UsageError` and its subclasses are bad input: the command line, a TOML file, a data file or a
checkpoint that cannot be used. The CLI prints their message as ONE line on stderr (no traceback)
and exits with code 2. Their messages must name the problem and the file or option it is in;
`one_line(err)` turns a foreign exception (OSError, h5py, zlib, ...) into text for such a message.
`env_rank()` is the rank to name in a message before MPI is initialized. This module imports
nothing of distbp: every layer may use it.
"""

import os

__all__ = ["UsageError", "ConfigError", "DataError", "CheckpointError", "OutputError",
           "SetupRefused",
           "CollectiveTimeout", "NonFiniteError", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE",
           "EXIT_PREEMPTED", "EXIT_STDOUT_CLOSED", "env_rank", "one_line"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what shells and mpiexec report for `... | head`


class UsageError(ValueError):
    """Bad input found before (or instead of) training: exit code 2, one line, no traceback."""


class ConfigError(UsageError):
    """A bad option, TOML key or value."""


class DataError(UsageError):
    """A data file that is missing, unreadable or inconsistent with the configuration."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, truncated, corrupt or of another architecture."""


class OutputError(UsageError):
    """An output file HDF5 was writing could not be written (a full disk). The HDF5 library may
    still hold it half-closed and crash while shutting down, so the process ends at once after
    saying so (distbp.launch), its temporary file already removed."""


class CollectiveTimeout(RuntimeError):
    """A collective call did not complete within the deadline (a peer rank died or hangs)."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


def one_line(err: BaseException) -> str:
    """`err`'s message on one line (HDF5, zlib and OS messages may span several); its type's name
    when the message is empty."""
    return " ".join(str(err).split()) or type(err).__name__


class SetupRefused(UsageError):
    """Bad input found at setup, known to every rank: each rank exits 2 (or, in a script, sees
    this exception) without an abort. `carrier` is True only on the rank that found it (the
    lowest failing one), which alone prints the message, so the user reads it once."""

    def __init__(self, message: str, carrier: bool):
        super().__init__(message)
        self.carrier = carrier


def env_rank() -> int:
    """This process's rank as the launcher's variables say, before MPI is initialized; 0 if none."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
