"""The serializers' names, apart from the serializers (``serialization.py``, which loads msgpack):
the settings rows check a name in every command, and most commands never serialize anything."""

from __future__ import annotations

#: The safe formats, which sessions accept (the keys of ``serialization.SAFE_SERIALIZERS``).
SAFE_NAMES = ("msgpack", "json")
#: Every format a cache accepts, pickle by explicit choice (``serialization.CACHE_SERIALIZERS``).
CACHE_NAMES = (*SAFE_NAMES, "pickle")
