from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest

import tokenrelay
import tokenrelay.server
import tokenrelay.testing
import tokenrelay.upstreams

PACKAGES = [tokenrelay, tokenrelay.testing, tokenrelay.upstreams, tokenrelay.server]


@pytest.mark.parametrize("module", PACKAGES)
def test_all_is_complete_and_importable(module: types.ModuleType) -> None:
    for name in module.__all__:
        getattr(module, name)  # the server's names are imported on first use
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert set(module.__all__) == public


@pytest.mark.parametrize("module", PACKAGES)
def test_public_api_has_docstrings(module: types.ModuleType) -> None:
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if not inspect.getdoc(value):
            missing.append(name)
        if inspect.isclass(value):
            for attr, member in vars(value).items():
                if attr.startswith("_") or (
                    not callable(member) and not isinstance(member, property)
                ):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    assert missing == []


def test_public_names_live_in_the_package() -> None:
    for name in tokenrelay.__all__:
        value = getattr(tokenrelay, name)
        if hasattr(value, "__module__") and inspect.isclass(value):
            assert value.__module__.startswith("tokenrelay")


CORE = ["_events", "_exceptions", "_guard", "_lifecycle", "_log", "_reaper", "_relay"]


def test_the_core_imports_nothing_from_upstreams_or_the_server() -> None:
    """The core (runs, guard, logs) stands alone: importing it, in a fresh interpreter, loads
    neither ``tokenrelay.upstreams`` nor ``tokenrelay.server``, nor what they are built on."""
    code = (
        "import sys\n"
        + "".join(f"import tokenrelay.{module}\n" for module in CORE)
        + "loaded = sorted(m for m in sys.modules if m.partition('.')[0] in {'quart', "
        "'quart_trio', 'hypercorn', 'werkzeug', 'prometheus_client', 'httpx2', 'httpcore2'} "
        "or m.startswith(('tokenrelay.upstreams', 'tokenrelay.server')))\n"
        "assert not loaded, loaded\n"
        "import tokenrelay\n"
        "tokenrelay.ChatRequest, tokenrelay.ServerConfig  # loaded on first use\n"
        "assert 'tokenrelay.upstreams' in sys.modules and 'quart' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
