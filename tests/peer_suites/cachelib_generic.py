"""cachelib's backend-neutral tests against the cluster cache (copied next to cachelib's tests at
run time by tests/test_peer_suites.py; its classes come from cachelib's own files)."""

import pytest
import test_redis_cache as redis_tests
from clear import ClearTests
from common import CommonTests
from delete_many_with_prefix import DeleteManyWithPrefixTests
from has import HasTests
from serializer import SerializerTests


@pytest.fixture(autouse=True)
def cache_factory(request, key_prefix, immutant_cache_factory):
    def _factory(self, *args, **kwargs):
        kwargs.setdefault("key_prefix", key_prefix)
        return immutant_cache_factory(*args, **kwargs)

    request.cls.cache_factory = _factory


class TestImmutantCache(CommonTests, ClearTests, HasTests, DeleteManyWithPrefixTests, SerializerTests):
    test_callable_key = redis_tests.TestRedisCache.test_callable_key
