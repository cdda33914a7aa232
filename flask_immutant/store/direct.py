"""One command on a pooled connection, without redis-py's per-call machinery.

redis-py's ``Redis.execute_command`` wraps every call in retries, observability hooks and
argument filtering: about 40 us on top of a 40 us round trip on a unix socket, which is half of
a cache read. The hot cache paths (a plain ``GET``/``SET``) send their command on a connection
taken from the client's own pool instead, through the pool's and the connection's public methods
(``get_connection``, ``send_command``, ``read_response``, ``release``; a contract test in
tests/test_cache.py holds them). A connection error falls back to the full client, so a stale
pooled connection costs a retry there, as before, never a miss.
"""

from __future__ import annotations

from typing import Any

import redis

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` for commands without a response callback (GET, SET...):
    the raw reply (SET answers ``b"OK"`` or ``None``). Redis errors (``ResponseError``) raise."""
    pool = client.connection_pool
    try:
        connection = pool.get_connection()
    except CONNECTION_ERRORS:
        return client.execute_command(*args)  # the client's retries decide, as they did before
    try:
        connection.send_command(*args)
        reply = connection.read_response()
    except CONNECTION_ERRORS:
        connection.disconnect()
        pool.release(connection)
        return client.execute_command(*args)
    except BaseException:
        pool.release(connection)
        raise
    pool.release(connection)
    return reply
