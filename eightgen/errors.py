"""The one exception type users see: a problem with their input, stated in one line."""


class EightgenError(Exception):
    """A user-facing error: bad config, missing or corrupt data, a wrong model file."""
