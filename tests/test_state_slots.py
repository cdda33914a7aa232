"""Per-app state is typed: each feature keeps its object in a ``Slot`` (flask_immutant/protocols.py)."""

from __future__ import annotations

import pytest
from flask import Flask

from flask_immutant import ImmutantExtension, daemons, get_state
from flask_immutant.daemons.registry import DAEMONS, DaemonRegistry
from flask_immutant.protocols import Slot
from flask_immutant.state import ImmutantState


class Greeter:
    def __init__(self, state: ImmutantState) -> None:
        self.cluster = state.keys.cluster


GREETER: Slot[Greeter] = Slot("test-greeter")


def test_a_plugin_keeps_its_object_in_its_own_slot() -> None:
    state = ImmutantState.build({}, environ={})
    # Given nothing in the slot
    assert state.get(GREETER) is None and state.pop(GREETER) is None
    # When the object is made on first use, it is the one kept, and made once
    first = state.feature(GREETER, Greeter)
    assert state.feature(GREETER, Greeter) is first is state.get(GREETER)
    # Then the read-only view shows it by name, and refuses writes
    assert state.features == {"test-greeter": first}
    with pytest.raises(TypeError):
        state.features["test-greeter"] = object()  # type: ignore[index]
    # And pop takes it out
    assert state.pop(GREETER) is first and state.get(GREETER) is None


def test_a_feature_declaration_lands_in_the_feature_slot() -> None:
    app = Flask("slots")
    ImmutantExtension(app)
    daemons.declare("slot-daemon", lambda: None, app=app)
    registry = get_state(app).get(DAEMONS)
    assert isinstance(registry, DaemonRegistry) and list(registry.specs) == ["slot-daemon"]
