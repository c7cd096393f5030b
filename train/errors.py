"""What stops a run or a tool, and the exit code it ends with (the README's table). Without torch,
so that `python -m train` can refuse bad input before it imports anything slow.
"""

EXIT_BAD_INPUT = 2  # a config, data, checkpoint or run.dir the run cannot use: nothing was written
EXIT_NONFINITE = 3  # stopped on a non-finite loss or gradient; the last checkpoint is intact
EXIT_WRITE_FAILED = 74  # EX_IOERR: a file of the run could not be written; the checkpoints already written are intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; requeue and the run resumes


class RunError(Exception):
    """Input a run cannot start or go on with (EXIT_BAD_INPUT); the message names what is wrong and the fix. Not a
    ValueError: code that turns a library's ValueError into one of these must not catch the project's own."""


class ConfigError(RunError):
    """A configuration the run cannot start with; the message names the key and the fix."""


class DataError(RunError):
    """Data that cannot be used; the message names the file or source and how to fix it."""


class CheckpointError(RunError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class RunWriteError(OSError):
    """A file of the run could not be written (a full disk, a quota): the run stops (EXIT_WRITE_FAILED) and says
    where it can resume."""


class HubError(CheckpointError):
    """A Hugging Face Hub repository that cannot be read or written to (a generator's source like a checkpoint
    folder); the message names it and the fix."""
