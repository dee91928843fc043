"""One line per event on stderr: time, level, message."""

import logging
import sys

LOGGER_NAME = "kakeya"


def setup_logging(level: str = "info") -> logging.Logger:
    """Send the daemon's and the engine's log lines to stderr at `level`."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger
