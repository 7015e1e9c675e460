"""The one exception type for user mistakes (bad config, checkpoint, data or flags).

The command line prints a `ZooError` as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class ZooError(Exception):
  """A problem with the user's input, reported as one line without a traceback."""


class StorageError(ZooError):
  """The storage under a run stopped taking its writes (a bucket that stopped answering: the
  clients' timeouts and retries spent). The command line exits at once after the line: orbax's
  background writes to that storage may still be waiting on it, and a process that joined
  them would outlive its error by minutes."""
