"""The console entry point: a user error raised anywhere below a command is one line and exit 2."""

from __future__ import annotations

import errno

import pytest

import cxr_diffusion.cli as cli
from cxr_diffusion.data.nih import DataError


def _raising(error: Exception):
    def app(standalone_mode: bool = True) -> None:
        raise error
    return app


def test_a_user_error_escaping_a_command_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", _raising(DataError("metadata.csv: line 3 has 12 fields\nbut the header has 11")))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: metadata.csv: line 3 has 12 fields but the header has 11\n"


def test_a_full_disk_under_a_command_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "app", _raising(OSError(errno.ENOSPC, "No space left on device", "generated/x.png")))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: no space left on the device writing generated/x.png;")


def test_a_bug_under_a_command_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "app", _raising(KeyError("latent_shape")))
    with pytest.raises(KeyError):
        cli.main()
