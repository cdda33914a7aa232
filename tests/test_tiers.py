"""The test tiers: every test gets its markers from the rule in conftest.py, none by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import SERVICE_TIERS, tiers_of

TIERS = {"unit", "nodes", *SERVICE_TIERS}


def item(nodeid: str, fixtures: list[str], params: dict[str, object] | None = None) -> pytest.Item:
    callspec = SimpleNamespace(params=params) if params is not None else None
    return SimpleNamespace(nodeid=nodeid, fixturenames=fixtures, callspec=callspec)  # type: ignore[return-value]


@pytest.mark.parametrize(("nodeid", "fixtures", "params", "expected"), [
    ("tests/test_cache.py::test_a", ["embedded_store", "store_client"], None, {"unit"}),
    ("tests/test_new.py::test_b", ["start_node", "node_env", "tmp_path"], None, {"nodes"}),
    ("tests/test_new.py::test_c", ["two_nodes", "node_env"], None, {"nodes"}),
    ("tests/test_messaging.py::test_d[mq]", ["broker", "node_env"], {"broker": "rabbitmq"}, {"nodes", "rabbitmq"}),
    ("tests/test_messaging.py::test_d[redis]", ["broker", "node_env"], {"broker": "redis"}, {"nodes"}),
    ("tests/test_balancer_haproxy.py::test_e", ["tmp_path"], None, {"nodes", "haproxy"}),
    ("tests/test_console_browser.py::test_f", ["browser", "node_env"], None, {"nodes", "browser"}),
    ("tests/test_multihost.py::test_g", ["netns_cluster"], None, {"nodes", "multihost"}),
])
def test_the_rule_puts_a_test_in_its_tiers(nodeid, fixtures, params, expected):
    assert tiers_of(item(nodeid, fixtures, params)) == expected


def test_every_collected_test_is_in_exactly_one_of_unit_or_the_others(request: pytest.FixtureRequest):
    for collected in request.session.items:
        tiers = {mark.name for mark in collected.iter_markers()} & TIERS
        assert tiers, f"{collected.nodeid} has no tier"
        assert ("unit" in tiers) == (tiers == {"unit"}), f"{collected.nodeid}: {tiers}"
