"""A cached attribute computed once per instance even when threads race for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast, overload

T = TypeVar("T")


class computed_once(Generic[T]):  # a decorator, lower case like cached_property
    """``functools.cached_property`` whose value is computed once per instance even when threads
    race for it (Python 3.12 dropped cached_property's lock). For the store client: a second
    client made by a racing thread replaced the first, whose ``__del__`` closed its pool, tearing
    down connections the first thread was reading on. Kept in the instance's ``__dict__`` like
    cached_property, so setting ``__dict__[name]`` first still wins."""

    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> computed_once[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> computed_once[T] | T:
        if instance is None:
            return self
        cache = instance.__dict__
        lock = cache.setdefault(f"_{self.name}_lock", threading.Lock())  # setdefault is atomic
        with lock:  # one thread computes; the others wait for its value
            if self.name in cache:
                return cast("T", cache[self.name])
            value = cache[self.name] = self.func(instance)
            return value
