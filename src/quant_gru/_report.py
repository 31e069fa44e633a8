"""Where `verbose=True` output goes: the `quant_gru` logger, made visible if unconfigured."""

from __future__ import annotations

import logging

logger = logging.getLogger("quant_gru")


def report(verbose: bool, message: str) -> None:
    """Log `message` at INFO; with verbose, make sure it reaches stderr."""
    if verbose and not logger.handlers and not logging.getLogger().handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    if verbose:
        logger.info(message)
    else:
        logger.debug(message)
