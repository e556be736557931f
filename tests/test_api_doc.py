"""docs/API.md lists every public name (the __all__ of each public module) with a
signature that names every parameter, so the page cannot fall behind the code."""
import importlib
import inspect
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parent.parent / "docs" / "API.md"
MODULES = ["vqkernels", "vqkernels.ops", "vqkernels.nn", "vqkernels.sampling", "vqkernels.models",
           "vqkernels.demo"]
HEADING = re.compile(r"^### (.+)$", re.MULTILINE)


def documented_entries() -> dict[str, str]:
    """{qualified name: its entry's text}; a heading may name several, `a`, `b`."""
    text = API.read_text()
    parts = HEADING.split(text)[1:]
    entries = {}
    for heading, body in zip(parts[::2], parts[1::2]):
        for name in re.findall(r"`([\w.]+)`", heading):
            entries[name] = body
    return entries


def public_names():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            yield f"{module_name}.{name}", getattr(module, name)


PUBLIC = dict(public_names())


@pytest.mark.parametrize("qualified", sorted(PUBLIC))
def test_every_public_name_is_documented(qualified):
    entries, obj = documented_entries(), PUBLIC[qualified]
    assert qualified in entries, f"docs/API.md has no entry for {qualified}"
    if inspect.ismodule(obj) or not callable(obj) or inspect.isclass(obj) and issubclass(
            obj, Exception):
        return
    body, signature = entries[qualified], inspect.signature(obj)
    if "The same class as" in body:
        return
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        assert re.search(rf"\b{param.name}\b", body), (
            f"docs/API.md: {qualified}'s entry does not name its parameter {param.name!r}")


def test_no_entry_for_a_name_that_is_gone():
    stale = set(documented_entries()) - set(PUBLIC) - {"vqkernels.reference"}
    assert not stale, f"docs/API.md documents names that are not public: {sorted(stale)}"
