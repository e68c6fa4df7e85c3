"""PeerAuthz alone: a caller the handshake's allow/deny rules refused gets 403 naming the rule; others pass."""

from __future__ import annotations

import pytest

from mesh.errors import MeshError
from mesh.pipeline.authz import PeerAuthz
from mesh.transport import Accepted
from tests.component.pipeline_doubles import RecordingLayer, ScriptedSide, request, started

CALLER = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"


async def test_a_refused_caller_gets_403_naming_the_rule(autojump_clock) -> None:
    inner = RecordingLayer()
    accepted = Accepted(None, CALLER, allowed=False, rule="deny web")  # type: ignore[arg-type]
    side = ScriptedSide(accepted=accepted)
    head = request()
    with pytest.raises(MeshError) as caught:
        await PeerAuthz(inner)(side, head, started(side, head))
    assert (caught.value.status, caught.value.code) == (403, "denied")
    assert caught.value.reason == f"caller {CALLER} denied: deny web"
    assert inner.calls == []


async def test_an_allowed_caller_passes_to_the_next_layer(autojump_clock) -> None:
    inner = RecordingLayer(result=False)
    accepted = Accepted(None, CALLER, allowed=True, rule="allow web")  # type: ignore[arg-type]
    side = ScriptedSide(accepted=accepted)
    head = request(target=b"/orders")
    ex = started(side, head)
    assert await PeerAuthz(inner)(side, head, ex) is False  # the next layer's answer, unchanged
    assert inner.call.target == b"/orders" and inner.call.ex is ex
