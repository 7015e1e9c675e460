"""The one exception type for user mistakes (bad config, checkpoint, data or flags).

The command line prints a `ZooError` as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class ZooError(Exception):
  """A problem with the user's input, reported as one line without a traceback."""
