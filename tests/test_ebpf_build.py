"""Building the eBPF programs: cached by source hash, a clear error without clang, and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ebpf import build


def test_missing_clang_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JASPER_CLANG", "clang-that-does-not-exist")
    with pytest.raises(build.BuildError, match=r"clang not found.*libbpf-dev"):
        build.build("relay", out_dir=tmp_path)


def test_cli_build_reports_missing_clang(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jasper_cli.main import main

    monkeypatch.setenv("JASPER_CLANG", "clang-that-does-not-exist")
    assert main(["ebpf", "build"]) == 1
    assert "jasper ebpf: error: clang not found" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
def test_objects_are_cached_by_source_hash(tmp_path: Path) -> None:
    first = build.build("receiver", out_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = build.build("receiver", out_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    other = build.build("receiver", out_dir=tmp_path, defines={"JASPER_RING_SLOTS": 1024})
    assert other != first and other.exists()
    assert first.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
def test_compiler_errors_are_reported(tmp_path: Path) -> None:
    with pytest.raises(build.BuildError, match="at least F"):
        build.build("relay", out_dir=tmp_path, defines={"JASPER_MAX_TARGETS": 8})
    with pytest.raises(build.BuildError, match="power of two"):
        build.build("receiver", out_dir=tmp_path, defines={"JASPER_RING_SLOTS": 1000})


def test_unknown_program() -> None:
    with pytest.raises(ValueError, match="unknown program"):
        build.build("switch")
