"""Messages for the person at the terminal: on stderr, without breaking progress bars."""

import sys

from tqdm.auto import tqdm


def note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
