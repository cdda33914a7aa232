"""Flask-Caching's backend-neutral ``GenericCacheTests`` against the cluster cache (copied next to
Flask-Caching's tests at run time by tests/test_peer_suites.py; the tests are theirs)."""

import time

import pytest
from immutant_peers import MODE
from test_backend_cache import GenericCacheTests


class TestImmutantCache(GenericCacheTests):
    @pytest.fixture(params=[None, "werkzeug-test-case:"])
    def make_cache(self, request, immutant_cache_factory):
        return lambda: immutant_cache_factory(key_prefix=request.param)

    @pytest.fixture
    def sleep(self, request):
        """Their fake clock drives the local cache; Redis expires by its own, so the store modes sleep."""
        return request.getfixturevalue("clock").advance if MODE == "local" else time.sleep
