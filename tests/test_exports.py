from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest

import tokenrelay
import tokenrelay.testing


@pytest.mark.parametrize("module", [tokenrelay, tokenrelay.testing])
def test_all_is_complete_and_importable(module: types.ModuleType) -> None:
    for name in module.__all__:
        getattr(module, name)  # the server's names are imported on first use
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert set(module.__all__) == public


@pytest.mark.parametrize("module", [tokenrelay, tokenrelay.testing])
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


def test_the_library_alone_loads_no_server_code() -> None:
    """``import tokenrelay`` in a program that uses only the library loads no web framework:
    the server's names are imported on first use."""
    code = (
        "import sys, tokenrelay\n"
        "loaded = sorted({m.partition('.')[0] for m in sys.modules}"
        " & {'quart', 'quart_trio', 'hypercorn', 'werkzeug', 'prometheus_client'})\n"
        "assert not loaded, loaded\n"
        "tokenrelay.ServerConfig\n"
        "assert 'quart' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
