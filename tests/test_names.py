"""The one set of name rules (flask_immutant/names.py) and the places that must apply them."""

from __future__ import annotations

from pathlib import Path

import pytest

from flask_immutant import names
from flask_immutant.balancer.haproxy import render_config
from flask_immutant.contexts.registry import Context
from flask_immutant.deploy.records import Deployment, DeploymentError


@pytest.mark.parametrize("value", ["shop", "shop-2", "a.b_c", "x" * 64, "9"])
def test_good_names(value):
    assert names.name(value) == value


@pytest.mark.parametrize("value", ["", ".", "..", "../x", "/abs", "a/b", "-x", "_x", "x" * 65, "a b", "a\nb", "é", 3,
                                   None])
def test_bad_names(value):
    with pytest.raises(ValueError, match="letters, digits"):
        names.name(value)


@pytest.mark.parametrize(("value", "normal"), [("/", "/"), ("/shop", "/shop"), ("/shop/", "/shop"),
                                                ("/a/b.c/d_e~f-g", "/a/b.c/d_e~f-g")])
def test_good_context_paths_are_normalised(value, normal):
    assert names.context_path(value) == normal


@pytest.mark.parametrize("value", ["", "shop", "//", "/a//b", "/a/../b", "/.", "/a b", "/x\n  server evil 1.2.3.4:80",
                                   "/a;b", "/a#b", "/a{b}", "/" + "a" * 200, None])
def test_bad_context_paths(value):
    with pytest.raises(ValueError, match="segments of letters"):
        names.context_path(value)


@pytest.mark.parametrize("value", ["127.0.0.1", "::1", "fe80::1%eth0", "node-1.example.com"])
def test_good_hosts(value):
    assert names.host(value) == value


@pytest.mark.parametrize("value", ["", "a b", "h;x", "h\nx", "[::1]", "x" * 254])
def test_bad_hosts(value):
    with pytest.raises(ValueError, match="host name or IP address"):
        names.host(value)


def test_a_child_path_never_leaves_its_base(tmp_path: Path):
    assert names.child(tmp_path, "shop", "abc") == tmp_path / "shop" / "abc"
    for parts in (("..", "x"), ("/etc",), ("a/../..",)):
        with pytest.raises(ValueError):
            names.child(tmp_path, *parts)


def test_records_apply_the_rules():
    with pytest.raises(DeploymentError, match=r"deployment name '\.\./\.\./x'"):
        Deployment(name="../../x", import_path=None, root="/srv")
    with pytest.raises(DeploymentError, match="context path"):
        Deployment(name="x", import_path=None, root="/srv", context_path="/x\nserver evil")
    with pytest.raises(DeploymentError, match="archive"):
        Deployment(name="x", import_path=None, root="/srv", archive="../../etc")
    assert Deployment(name="x", import_path=None, root="/srv", context_path="/x/").context_path == "/x"


def test_contexts_and_the_haproxy_writer_apply_the_rules(tmp_path: Path):
    with pytest.raises(ValueError, match="node"):
        Context("a;b", "/", "app", "127.0.0.1", 1, 100, 1, 0.0)
    with pytest.raises(ValueError, match="host"):
        Context("a", "/", "app", "127.0.0.1 backup", 1, 100, 1, 0.0)
    with pytest.raises(ValueError, match="context path"):
        render_config(["/x\n    server evil 10.0.0.1:80"], socket_path=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="bind address"):
        render_config(["/"], bind="127.0.0.1:80\n    server evil", socket_path=str(tmp_path / "s"))
