"""Messages for the person at the terminal: on stderr, without breaking progress bars."""

import os
import sys

from tqdm import autonotebook, std
from tqdm.auto import tqdm

# Where stderr is not a terminal (a batch job's log file, a pipe), a bar's every redraw is kept: at
# tqdm's default of ten a second, a day of scoring would write some 80 MB of them. There it redraws
# twice a minute instead, unless TQDM_MININTERVAL says otherwise.
LOG_REFRESH_S = 30.0
# Where tqdm.auto chose Jupyter's widget, redraws leave no lines behind: nothing to slow down.
_WIDGET = autonotebook.tqdm is not std.tqdm


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm progress bar on stderr, redrawn every ``LOG_REFRESH_S`` when stderr is not a terminal."""
    kwargs.setdefault("file", sys.stderr)
    # tqdm's own reading of the environment: the prefix TQDM_ as written, the option's name in any case
    user_set = any(k.startswith("TQDM_") and k[5:].lower() == "mininterval" for k in os.environ)
    if not _WIDGET and not _is_terminal(kwargs["file"]):
        if not user_set:
            kwargs.setdefault("mininterval", LOG_REFRESH_S)
        # A bar that cleared itself would leave its last redraw without a line end, and the next result
        # line (stdout, in the same log) would run on from it: in a log, every bar ends its own line.
        kwargs["leave"] = True
    return tqdm(*args, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)
