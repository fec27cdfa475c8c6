"""MetaSchedule's loggers, configured so that handlers the application attached cannot break it.

Every time MetaSchedule makes tuning contexts for a work directory it rebuilds its logging
configuration (`tvm.s_tir.meta_schedule.logging.create_loggers`) with `logging.config.dictConfig`,
listing the handlers already on its logger `tvm.s_tir.meta_schedule` by name. A handler that
someone else attached there (pytest's log capture attaches its unnamed handler to every logger
that does not propagate, which MetaSchedule's logger is after its first tune; a notebook or a
service may attach its own) has no name (`AttributeError: 'NoneType' object has no attribute
'format'`) or a name the configuration does not define (`ValueError: Unable to configure
logger`), and every later tune in the process fails. `configuring()` takes such handlers off
for the duration of that call and puts them back, so they still receive what the tune logs.
"""

from __future__ import annotations

import contextlib
import logging

LOGGER = "tvm.s_tir.meta_schedule"


def _foreign(handler: logging.Handler) -> bool:
    """Whether MetaSchedule did not make `handler` (its own are named after its loggers)."""
    return not (handler.get_name() or "").startswith(LOGGER + ".")


@contextlib.contextmanager
def configuring():
    """Around a MetaSchedule call that configures its loggers (making tuning contexts)."""
    logger = logging.getLogger(LOGGER)
    foreign = [handler for handler in logger.handlers if _foreign(handler)]
    for handler in foreign:
        logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in foreign:
            logger.addHandler(handler)  # a no-op for a handler that is there already


__all__ = ["LOGGER", "configuring"]
