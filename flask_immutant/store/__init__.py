"""The cluster store: a Redis client from a URL, or the embedded Redis of this machine."""

from __future__ import annotations

from .connect import client_from_url, close_quietly, describe_url, existing_store, store_url
from .embedded import EmbeddedStore

__all__ = ["EmbeddedStore", "client_from_url", "close_quietly", "describe_url", "existing_store", "store_url"]
