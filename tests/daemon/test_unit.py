import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.unit import render_unit


def test_unit_has_hardening(tmp_path: Path):
    text = render_unit(Config(home=tmp_path / "home"), user=True, executable=Path("/usr/bin/true"))
    for line in (
        "Type=notify",
        "WatchdogSec=120",
        "Restart=on-failure",
        "MemoryMax=4096M",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "PrivateTmp=true",
        f"ReadWritePaths=-{tmp_path / 'home'}",
        "RestrictAddressFamilies=AF_UNIX",
        "WantedBy=default.target",
        f"Environment=A3X_HOME={tmp_path / 'home'}",
    ):
        assert line in text.splitlines() or any(row.startswith(line) for row in text.splitlines())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze(tmp_path: Path):
    unit = tmp_path / "a3x.service"
    unit.write_text(
        render_unit(Config(home=tmp_path / "home"), user=False, executable=Path("/usr/bin/true"))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_shipped_unit_passes_systemd_analyze(tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing")
    shipped = Path(__file__).parents[2] / "systemd" / "a3x.service"
    copy = tmp_path / "a3x.service"
    copy.write_text(shipped.read_text().replace("/usr/bin/env a3x", "/usr/bin/true"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
