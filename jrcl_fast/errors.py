"""The exceptions the CLI turns into one line without a traceback."""


class UserError(Exception):
    """A mistake in a config, a data set or a command line.

    The CLI prints its message as one line, without a traceback. The message names
    the file, line, key or argument at fault and says what to do.
    """


class RankFailure(Exception):
    """The ranks could not start or go on together: the master was not reachable, a peer
    could not be reached, or a collective failed or timed out because a rank died or hangs.
    The message says which, from the evidence at hand.

    The CLI prints its message without a traceback and exits with code 1.
    """


class CheckFailure(Exception):
    """`jrcl-fast doctor` found a failing check (the table shows which): exit code 1."""


class ConfigWarning(UserWarning):
    """A config whose keys combine into less than they ask for (a setting that does
    nothing, a warmup that outlasts training, bf16 on a CPU that runs it far slower than
    fp32); the CLI prints it as one line."""
