"""The fence around uvicorn's internals that service/protocol.py builds on (pyproject.toml pins the range it
was tested on, where this and tests/service/test_protocol.py pass): every method of uvicorn's ``HttpToolsProtocol`` that ``LimitedHttpToolsProtocol`` overrides
or calls has the signature recorded here, every attribute it reads is still set by uvicorn, uvicorn still
calls the hooks (``_start_asgi_task``, ``shutdown``), the ``data_received`` it rewrites is the one it
was written against, and none of its own names shadows one of uvicorn's. A uvicorn release that moves any
of this fails here, naming what moved, rather than serving without the early refusals.

The names used are found in protocol.py's source (``self.<name>`` not defined there, ``super().<name>``),
so a new use of uvicorn's internals must be recorded here before this test passes."""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import textwrap

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import Server

from service import protocol
from service.protocol import LimitedHttpToolsProtocol

# HttpToolsProtocol's methods that protocol.py overrides or calls, as they were when it was written
# (parameters without annotations): uvicorn 0.54.0 and 0.55.0 (pyproject.toml's range).
METHODS = {
    "__init__": "(self, config, server_state, app_state, _loop=None)",
    "connection_made": "(self, transport)",
    "connection_lost": "(self, exc)",
    "data_received": "(self, data)",  # rewritten: see DATA_RECEIVED_SHA256
    "on_message_begin": "(self)",
    "on_headers_complete": "(self)",
    "on_body": "(self, body)",
    "on_message_complete": "(self)",
    "on_response_complete": "(self)",
    "shutdown": "(self)",
    "handle_websocket_upgrade": "(self)",
    # private
    "_start_asgi_task": "(self, cycle, app)",
    "_unset_keepalive_if_required": "(self)",
    "_should_upgrade": "(self)",
}
# HttpToolsProtocol's instance attributes that protocol.py reads.
ATTRIBUTES = {
    "app",
    "app_state",
    "connections",
    "cycle",
    "headers",
    "loop",
    "parser",
    "server_state",
    "transport",
    "url",
}
# RequestResponseCycle's attributes that protocol.py reads or sets (the early answers).
CYCLE_ATTRIBUTES = {"scope", "response_complete", "waiting_for_100_continue", "keep_alive", "more_body"}
# The hash of uvicorn's HttpToolsProtocol.data_received (its source, dedented) that
# LimitedHttpToolsProtocol.data_received replaces: when uvicorn changes it, port the change, then record it.
DATA_RECEIVED_SHA256 = "02c2572f1df559070eba7f206a3f7e251782f5af4aaae194fc1ffb67f24c3873"


def shape(method: object) -> str:
    """``method``'s parameters, without annotations: ``(self, cycle, app)``."""
    signature = inspect.signature(method)  # type: ignore[arg-type]
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def protocol_class() -> ast.ClassDef:
    tree = ast.parse(inspect.getsource(protocol))
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LimitedHttpToolsProtocol")


def self_attributes(node: ast.AST) -> set[str]:
    """Every ``self.<name>`` in ``node``."""
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def own_names(cls: ast.ClassDef) -> set[str]:
    """What protocol.py defines on its class: methods and the attributes it assigns."""
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    assigned: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                    assigned |= self_attributes(item) if isinstance(item, ast.Attribute) else set()
    return methods | assigned


def uvicorn_names(cls: ast.ClassDef) -> set[str]:
    """uvicorn's names protocol.py uses: ``self.<name>`` it does not define, ``super().<name>`` and every
    method it overrides."""
    own = own_names(cls)
    supers = {
        n.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Call)
        and isinstance(n.value.func, ast.Name)
        and n.value.func.id == "super"
    }
    overridden = {n for n in own if hasattr(HttpToolsProtocol, n) and n in vars(LimitedHttpToolsProtocol)}
    return (self_attributes(cls) - own) | supers | overridden


def assigned_by(cls: type) -> set[str]:
    """The ``self.<name>`` that ``cls``'s source assigns."""
    return set(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=(?!=)", inspect.getsource(cls)))


def test_every_uvicorn_name_used_is_recorded():
    used = uvicorn_names(protocol_class())
    unrecorded = used - set(METHODS) - ATTRIBUTES
    assert not unrecorded, f"protocol.py uses uvicorn's {sorted(unrecorded)}: record them in this test"
    assert used == set(METHODS) | ATTRIBUTES, (
        f"recorded but no longer used: {sorted(set(METHODS) | ATTRIBUTES - used)}"
    )


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_still_exists_with_its_signature(name):
    method = getattr(HttpToolsProtocol, name, None)
    where = f"uvicorn {uvicorn.__version__}: HttpToolsProtocol.{name}"
    assert callable(method), f"{where} is gone; service/protocol.py overrides or calls it"
    assert shape(method) == METHODS[name], f"{where} is now {shape(method)}, not {METHODS[name]}"


def test_the_attributes_read_are_still_set_by_uvicorn():
    missing = ATTRIBUTES - assigned_by(HttpToolsProtocol)
    assert not missing, f"uvicorn {uvicorn.__version__}'s HttpToolsProtocol no longer sets {sorted(missing)}"
    missing = CYCLE_ATTRIBUTES - assigned_by(RequestResponseCycle)
    assert not missing, (
        f"uvicorn {uvicorn.__version__}'s RequestResponseCycle no longer sets {sorted(missing)}"
    )
    assert all(s in httptools_impl.STATUS_LINE for s in (400, 408, 431, 503))
    assert "default_headers" in assigned_by(uvicorn.server.ServerState)
    assert issubclass(httptools.HttpParserUpgrade, Exception)
    assert issubclass(httptools.HttpParserError, Exception)


def test_uvicorn_still_calls_the_hooks():
    """The early answers run only where uvicorn starts a request (``_start_asgi_task``: a request whose
    headers are complete, or the next one pipelined), and the drain starts only if the server calls
    ``shutdown()`` on each connection."""
    for caller in (HttpToolsProtocol.on_headers_complete, HttpToolsProtocol.on_response_complete):
        assert "self._start_asgi_task(" in inspect.getsource(caller), (
            f"uvicorn {uvicorn.__version__}: {caller.__qualname__} no longer calls _start_asgi_task"
        )
    # An early answer closes the connection when the request asked to (``cycle.keep_alive``): uvicorn 0.53
    # and older set keep_alive from the HTTP version alone (tests/service/test_protocol.py then fails).
    assert "self.parser.should_keep_alive()" in inspect.getsource(HttpToolsProtocol.on_headers_complete), (
        f"uvicorn {uvicorn.__version__}: a request cycle's keep_alive no longer follows the request"
    )
    assert "connection.shutdown()" in inspect.getsource(Server.shutdown), (
        f"uvicorn {uvicorn.__version__}: Server.shutdown no longer calls shutdown() on each connection"
    )


def test_the_rewritten_data_received_replaces_the_one_it_was_written_against():
    source = textwrap.dedent(inspect.getsource(HttpToolsProtocol.data_received))
    assert hashlib.sha256(source.encode()).hexdigest() == DATA_RECEIVED_SHA256, (
        f"uvicorn {uvicorn.__version__} changed HttpToolsProtocol.data_received, which "
        f"LimitedHttpToolsProtocol.data_received rewrites: port the change, then record the new hash:\n{source}"
    )


def test_own_names_do_not_shadow_uvicorn():
    """A private name of protocol.py's that uvicorn starts to use would silently replace uvicorn's."""
    own = own_names(protocol_class()) - set(METHODS) - ATTRIBUTES
    shadowed = {n for n in own if hasattr(HttpToolsProtocol, n)} | (own & assigned_by(HttpToolsProtocol))
    assert not shadowed, f"uvicorn {uvicorn.__version__}'s HttpToolsProtocol now has {sorted(shadowed)} too"


def test_the_import_check_covers_every_private_method():
    private = {n for n in METHODS if n.startswith("_") and not n.startswith("__")}
    assert set(protocol.UVICORN_PRIVATE) == private
