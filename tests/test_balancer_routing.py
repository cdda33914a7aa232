"""The balancers' state machine (balancer/routing.py): contexts, stickiness, states, weights."""

from __future__ import annotations

import itertools
import random

from flask_immutant.balancer.routing import choose, decide, match_context
from flask_immutant.contexts.registry import Server


def backend(node: str, state: str = "ENABLED", weight: int = 100) -> Server:
    return Server(node, "127.0.0.1", 1000 + ord(node[0]), weight, state)


def test_the_longest_context_path_containing_the_request_wins():
    paths = ["/", "/shop", "/shop/admin"]
    assert match_context(paths, "/") == "/"
    assert match_context(paths, "/shop") == "/shop"
    assert match_context(paths, "/shop/cart") == "/shop"
    assert match_context(paths, "/shopping") == "/"
    assert match_context(paths, "/shop/admin/users") == "/shop/admin"
    assert match_context(["/shop"], "/other") is None


def test_a_route_cookie_keeps_a_session_on_its_enabled_or_disabled_node():
    backends = [backend("a", "DISABLED"), backend("b")]
    assert choose(backends, route="a") == (backends[0], True)
    assert choose(backends, route="b") == (backends[1], True)


def test_new_sessions_go_to_enabled_nodes_only():
    backends = [backend("a", "DISABLED"), backend("b"), backend("c", "STOPPED")]
    for point in (0.0, 0.5, 0.999):
        assert choose(backends, rand=lambda point=point: point) == (backends[1], False)


def test_a_stopped_or_gone_sticky_node_sends_the_session_elsewhere():
    backends = [backend("a", "STOPPED"), backend("b")]
    assert choose(backends, route="a") == (backends[1], False)
    assert choose(backends, route="gone") == (backends[1], False)
    decision = decide({"/": backends}, "/x", route="a")
    assert decision.backend == backends[1] and decision.set_route == "b"


def test_an_excluded_node_is_skipped_even_when_sticky():
    backends = [backend("a"), backend("b")]
    assert choose(backends, route="a", exclude={"a"}) == (backends[1], False)
    assert choose(backends, exclude={"a", "b"}) == (None, False)


def test_the_choice_follows_the_load_factors():
    backends = [backend("a", weight=75), backend("b", weight=25), backend("z", weight=0)]
    rng = random.Random(7)
    counts = {"a": 0, "b": 0, "z": 0}
    for _ in range(4000):
        chosen, _sticky = choose(backends, rand=rng.random)
        assert chosen is not None
        counts[chosen.node] += 1
    assert counts["z"] == 0
    assert 2.5 < counts["a"] / counts["b"] < 3.6
    # the whole interval maps to an enabled node
    picks = {choose(backends, rand=lambda p=p: p)[0] for p in (0.0, 0.74, 0.76, 0.9999)}
    assert {b.node for b in picks if b is not None} == {"a", "b"}


def test_nothing_to_serve_says_why():
    assert "no app is deployed" in decide({}, "/x").reason
    decision = decide({"/": [backend("a", "STOPPED"), backend("b", "DISABLED")]}, "/x")
    assert decision.backend is None
    assert "a STOPPED" in decision.reason and "b DISABLED" in decision.reason
    unreachable = decide({"/": [backend("a")]}, "/", exclude={"a"})
    assert "a unreachable" in unreachable.reason


def test_every_state_combination_obeys_the_rules():
    states3 = ("ENABLED", "DISABLED", "STOPPED")
    for state_a, state_b, route in itertools.product(states3, states3, (None, "a", "b")):
        backends = [backend("a", state_a), backend("b", state_b)]
        chosen, sticky = choose(backends, route=route, rand=lambda: 0.0)
        states = {"a": state_a, "b": state_b}
        if chosen is None:
            assert all(s != "ENABLED" for s in states.values())
            assert route is None or states[route] == "STOPPED"
            continue
        assert states[chosen.node] != "STOPPED"
        if sticky:
            assert chosen.node == route
        else:
            assert states[chosen.node] == "ENABLED"
            assert route is None or states[route] == "STOPPED"
