"""Cluster cache throughput and latency against its Python peers, on one Redis, in one run.

A benchmark, not a test: it prints figures and asserts nothing. It starts a private embedded
store (a real redis-server on a unix socket under a temporary ``IMMUTANT_HOME``) and measures,
single-threaded, with the same small value (a dict of a few fields):

- ``get`` and ``set`` ops/s: ``caching.cache(mode="distributed")`` vs cachelib's ``RedisCache``;
- the encoding alone: the typed msgpack codec vs the plain msgpack it replaced, and the difference
  as a share of one ``get``/``set`` (the round trip hides it in the figures above);
- memoize hit latency: ``cache.memoize`` (distributed and invalidated) vs Flask-Caching's
  ``memoize`` on its ``RedisCache`` backend;
- hot-key read: ``mode="invalidated"`` (near cache) vs ``mode="distributed"`` (target >= 20x).

Each figure is the best of ``--repeat`` rounds of ``--ops`` operations (the rounds of the two
sides of a ratio interleaved); each ratio compares two figures of the same run. Needs
Flask-Caching: ``pip install flask-caching`` (it is in the ``test`` extra).

    python bench/cache.py [--ops 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

VALUE = {"id": 42, "name": "Ada Lovelace", "roles": ["admin", "author"], "score": 99.5}


def best_rate(op: Callable[[int], object], ops: int, repeat: int) -> float:
    """Operations per second: the best of ``repeat`` rounds (least disturbed by other work)."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(ops):
            op(i)
        best = max(best, ops / (time.perf_counter() - start))
    return best


def compare(a: Callable[[int], object], b: Callable[[int], object], ops: int, repeat: int) -> tuple[float, float]:
    """Best rates of ``a`` and ``b``, their rounds interleaved so that noise hits both alike."""
    rates = [0.0, 0.0]
    for _ in range(repeat):
        for which, op in enumerate((a, b)):
            rates[which] = max(rates[which], best_rate(op, ops, 1))
    return rates[0], rates[1]


def line(label: str, rate: float) -> str:
    return f"  {label:<52} {rate:>12,.0f} ops/s   {1e6 / rate:>8.1f} us/op"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    ops, repeat = args.ops, args.repeat

    import redis
    from cachelib.redis import RedisCache
    from flask import Flask
    from flask_caching import Cache as FlaskCaching

    from flask_immutant import ImmutantExtension, caching
    from flask_immutant.caching.caches import registry_for
    from flask_immutant.caching.serialization import MsgpackSerializer
    from flask_immutant.caching.typed import TypedMsgpackSerializer
    from flask_immutant.store import EmbeddedStore

    home = Path(tempfile.mkdtemp(prefix="imb-"))
    store = EmbeddedStore(home)
    try:
        url = store.ensure_running()
        for key in list(os.environ):
            if key.startswith("IMMUTANT_"):
                del os.environ[key]
        app = Flask("bench_cache")
        app.config.update(IMMUTANT_HOME=str(home), IMMUTANT_CACHE=True)
        ImmutantExtension(app)
        distributed = caching.cache("dist", app=app)
        invalidated = caching.cache("near", mode="invalidated", app=app)
        assert invalidated.tracking(10)  # type: ignore[attr-defined]
        peer_client = redis.Redis(unix_socket_path=str(store.socket))
        peer = RedisCache(host=peer_client, key_prefix="bench-cachelib:", default_timeout=0)
        flask_caching = FlaskCaching(app, config={"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": url,
                                                  "CACHE_KEY_PREFIX": "bench-fc:", "CACHE_DEFAULT_TIMEOUT": 300})

        print(f"flask-immutant cache benchmark: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}, redis-server {peer_client.info()['redis_version']} "
              f"on a unix socket; best of {repeat} x {ops} ops, one thread")

        keys = [f"k{i % 100}" for i in range(ops)]
        print("\nset (distinct keys, no expiry)")
        im_set, lib_set = compare(lambda i: distributed.set(keys[i], VALUE), lambda i: peer.set(keys[i], VALUE),
                                  ops, repeat)
        print(line("flask-immutant distributed", im_set))
        print(line("cachelib RedisCache (pickle)", lib_set))
        print(f"  ratio: {im_set / lib_set:.2f}x")

        print("\nget (hits, 100 keys)")
        im_get, lib_get = compare(lambda i: distributed.get(keys[i]), lambda i: peer.get(keys[i]), ops, repeat)
        print(line("flask-immutant distributed", im_get))
        print(line("cachelib RedisCache (pickle)", lib_get))
        print(f"  ratio: {im_get / lib_get:.2f}x")

        print("\nencoding alone (the same value, no store): typed msgpack vs the plain msgpack it replaced")
        plain, typed_codec = MsgpackSerializer(), TypedMsgpackSerializer()
        raw = typed_codec.dumps(VALUE)
        enc_typed, enc_plain = compare(lambda i: typed_codec.dumps(VALUE), lambda i: plain.dumps(VALUE),
                                       ops * 10, repeat)
        dec_typed, dec_plain = compare(lambda i: typed_codec.loads(raw), lambda i: plain.loads(raw), ops * 10, repeat)
        for label, op, now, before, op_rate in (("encode", "set", enc_typed, enc_plain, im_set),
                                                ("decode", "get", dec_typed, dec_plain, im_get)):
            extra_us = 1e6 / now - 1e6 / before
            print(f"  {label}: typed {1e6 / now:.2f} us, plain {1e6 / before:.2f} us; difference {extra_us:+.2f} us "
                  f"= {extra_us * op_rate / 1e6:+.1%} of a {op} above (target <= +5%)")

        print("\nmemoize hit (same arguments)")

        @distributed.memoize(300)
        def im_lookup(user: int) -> dict[str, object]:
            return VALUE

        @invalidated.memoize(300)
        def near_lookup(user: int) -> dict[str, object]:
            return VALUE

        @flask_caching.memoize(300)
        def fc_lookup(user: int) -> dict[str, object]:
            return VALUE

        with app.app_context():
            im_lookup(7), near_lookup(7), fc_lookup(7)
            im_memo = best_rate(lambda i: im_lookup(7), ops, repeat)
            near_memo = best_rate(lambda i: near_lookup(7), ops, repeat)
            fc_memo = best_rate(lambda i: fc_lookup(7), ops, repeat)
        print(line("flask-immutant memoize, distributed (1 round trip)", im_memo))
        print(line("flask-immutant memoize, invalidated (near hit)", near_memo))
        print(line("Flask-Caching memoize, RedisCache", fc_memo))
        print(f"  ratio distributed vs Flask-Caching: {im_memo / fc_memo:.2f}x; "
              f"invalidated vs Flask-Caching: {near_memo / fc_memo:.1f}x")

        print("\nhot-key read (one key, read over and over)")
        distributed.set("hot", VALUE)
        invalidated.set("hot", VALUE)
        invalidated.get("hot")
        hot_dist = best_rate(lambda i: distributed.get("hot"), ops, repeat)
        hot_near = best_rate(lambda i: invalidated.get("hot"), ops * 10, repeat)
        print(line("flask-immutant distributed", hot_dist))
        print(line("flask-immutant invalidated (near cache)", hot_near))
        print(f"  ratio invalidated vs distributed: {hot_near / hot_dist:.1f}x (target >= 20x)")

        registry_for(app).close()
        peer_client.close()
    finally:
        store.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
