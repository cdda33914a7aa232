"""A client's malformed request is one log line, never a traceback.

aiohttp answers a request its parser refuses (smuggling attempts, duplicate ``Host``, bytes that
are not HTTP) with 400, then logs the parser's exception with its traceback at ERROR: anyone who
can connect could fill the log with tracebacks. The balancer and the console both install this
filter on aiohttp's server logger.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError

#: aiohttp's logger for errors handling a request.
SERVER_LOGGER = "aiohttp.server"


class MalformedRequests(logging.Filter):
    """Turns a parse error's record into one INFO line naming the client and the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = next((line.strip() for line in str(exc.message).splitlines() if line.strip()), "unreadable")
            client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "malformed request from %s (400): %s", (client, reason)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def log_parse_errors_briefly() -> None:
    """Install :class:`MalformedRequests` on aiohttp's server logger (once)."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, MalformedRequests) for f in logger.filters):
        logger.addFilter(MalformedRequests())
