"""One command on a connection of a client's pool, without redis-py's per-call machinery.

redis-py's ``Redis.execute_command`` wraps every call in retries, observability hooks and
argument filtering, and its pool checks a connection out and in (a lock and a ``recv`` probe)
per call: together more than the round trip of a ``GET`` on a unix socket. The hot cache paths (a
plain ``GET``/``SET``) send their command on one connection a :class:`Pinned` keeps out of the
pool for them instead, through public methods only (``get_connection``, ``send_command``,
``read_response``, ``disconnect``, ``release``; a contract test in tests/test_cache.py holds
them). A thread that finds it busy uses the pool, and a connection error falls back to the full
client with its retries, so a stale connection costs a retry, as before, never a miss.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def command(redis_client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)`` for commands without a response callback (GET, SET...):
    the raw reply (SET answers ``b"OK"`` or ``None``). Redis errors (``ResponseError``) raise."""
    client: Any = redis_client  # redis-py's connection methods carry no type hints
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


class Pinned:
    """One connection of ``client``'s pool, kept for :meth:`command` (used by one thread at a
    time; the others use the pool meanwhile). Forgotten in a forked child, given back by
    :meth:`close`."""

    def __init__(self, client: redis.Redis) -> None:
        self.client: Any = client  # redis-py's connection methods carry no type hints
        self._lock = threading.Lock()
        self._connection: Any = None
        self._pid = os.getpid()

    def command(self, *args: Any) -> Any:
        """As :func:`command`."""
        if not self._lock.acquire(blocking=False):
            return command(self.client, *args)
        try:
            connection = self._connection
            if connection is None or self._pid != os.getpid():
                try:
                    connection = self._connection = self.client.connection_pool.get_connection()
                except CONNECTION_ERRORS:
                    self._connection = None
                    return self.client.execute_command(*args)  # the client's retries decide
                self._pid = os.getpid()
            try:
                connection.send_command(*args)
                return connection.read_response()
            except redis.ResponseError:
                raise  # the reply was read whole: the connection is in step
            except CONNECTION_ERRORS:
                connection.disconnect()
                return self.client.execute_command(*args)
            except BaseException:
                connection.disconnect()  # a reply may be left unread: never reuse it as it is
                raise
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None and self._pid == os.getpid():
                self.client.connection_pool.release(connection)
