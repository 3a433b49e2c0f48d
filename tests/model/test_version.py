"""One version for every layer (model/version.py): the CLI's --version and the service's OpenAPI and /v2."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError

import pytest

from model import version as version_module
from model.version import UNKNOWN, package_version


def test_the_installed_version_or_unknown(monkeypatch):
    def not_installed(name: str) -> str:
        raise PackageNotFoundError(name)

    installed = package_version()
    assert installed == UNKNOWN or installed[0].isdigit()
    monkeypatch.setattr(version_module, "version", not_installed)
    assert package_version() == UNKNOWN == "unknown"


def test_the_service_and_the_cli_report_the_same_version(capsys):
    pytest.importorskip("fastapi")
    from refinedet.cli import main
    from service.app import create_app

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"refinedet {create_app(loader=lambda s: None).version}\n"
