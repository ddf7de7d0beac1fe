"""How the plugin's commands end: bad input is a :class:`UserError`, printed as one line naming the
file, key or option and what was expected, with exit status 1; anything else is a bug and keeps its
traceback."""

import logging
import sys
from typing import Callable

LOG_FORMAT = "%(asctime)s (%(module)s:%(lineno)d) %(levelname)s: %(message)s"


class UserError(ValueError):
    """Bad input: a missing or malformed file, a bad option value, unreadable audio."""


def run(main: Callable[[], object], log_level: int | None = logging.INFO) -> None:
    """Run a command's ``main``: log to stderr (unless ``log_level`` is None: a program that
    configures logging itself runs next), and a user error ends it in one line."""
    if log_level is not None:
        logging.basicConfig(level=log_level, format=LOG_FORMAT)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    prog = spec.name if spec is not None else sys.argv[0]
    try:
        main()
    except UserError as err:
        sys.exit(f"{prog}: error: {err}")
