"""The one exception type for mistakes a user can make; the CLI turns it into one red line."""


class MuaError(Exception):
    """A user-facing error: bad input, missing files, data that cannot support a result."""
