"""The one exception type the command line turns into a clean one-line error."""


class LaionfilterError(Exception):
    """A problem with the user's input or files, with a message that names what and where."""
