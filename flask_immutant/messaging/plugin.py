"""Built-in plugin: messaging (queues, topics, request/respond on Dramatiq)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..hookspecs import hookimpl
from ..settings import Setting
from ..state import get_state
from .config import FLAG, SETTINGS

if TYPE_CHECKING:
    import redis

    from ..protocols import RuntimeView
    from ..state import ImmutantState
    from .core import Messaging

__all__ = ["FLAG", "messaging_of"]

FEATURE = "messaging"


def messaging_of(state: ImmutantState) -> Messaging:
    """The app's :class:`~.core.Messaging` (see :func:`.core.messaging_of`)."""
    from .core import messaging_of  # here: a CLI command that does not publish never imports Dramatiq

    return messaging_of(state)


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return list(SETTINGS)


@hookimpl(trylast=True)
def immutant_runtime_started(runtime: RuntimeView) -> None:
    messaging_of(get_state(runtime.app)).runtime_started(runtime)


@hookimpl(trylast=True)
def immutant_runtime_stopping(runtime: RuntimeView) -> None:
    messaging_of(get_state(runtime.app)).runtime_stopping(runtime)


@hookimpl(trylast=True)
def immutant_register_commands(cli: click.Group) -> None:
    from .cli import queues

    cli.add_command(queues)


@hookimpl(trylast=True)
def immutant_status(state: ImmutantState, store: redis.Redis) -> dict[str, Any]:
    import redis

    from .backends import make_backend
    from .status import queue_entries

    backend = make_backend(store, state.keys, state.settings["IMMUTANT_BROKER_URL"])
    try:
        return {"queues": queue_entries(backend, store, state.keys)}
    except redis.RedisError:
        return {"queues": None}
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
