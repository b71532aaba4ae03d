"""deploy/igtv-node.service is a valid, hardened systemd unit that matches the example config."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pacs_node.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "igtv-node.service"
EXEC = "/opt/igtv-node/.venv/bin/igtv-node"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package 'systemd')"
)


def unit_options() -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values...]}} of the unit (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        m = re.match(r"^\[(\w+)\]$", line)
        if m:
            section = m.group(1)
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_runs_serve_unprivileged_with_hardening() -> None:
    svc = unit_options()["Service"]
    assert svc["ExecStart"] == [f"{EXEC} serve --config /etc/igtv-node/node.toml"]
    assert svc["User"] == ["igtv"] and svc["Group"] == ["igtv"]
    assert svc["Restart"] == ["on-failure"]
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
    }.items():
        assert svc[key] == [value], key
    assert svc["CapabilityBoundingSet"] == [""]  # no capabilities at all
    # the only writable path is the example config's data_dir
    data_dir = load_config(DEPLOY / "node.toml").spool.data_dir
    assert svc["ReadWritePaths"] == [str(data_dir)]
    assert svc["StateDirectory"] == [data_dir.name]
    assert unit_options()["Install"]["WantedBy"] == ["multi-user.target"]
    configparser.ConfigParser(strict=False).read_string(UNIT.read_text())  # plain INI syntax


def _verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify the unit with ExecStart pointed at an executable stand-in."""
    stub = tmp_path / "igtv-node"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "igtv-node.service"
    unit.write_text(unit_text.replace(EXEC, str(stub)))
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


@needs_systemd
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """Negative control: the check above would notice a typo or a bad value."""
    broken = UNIT.read_text().replace("ProtectClock=yes", "ProtectClok=yes").replace(
        "NoNewPrivileges=yes", "NoNewPrivileges=maybe"
    )
    result = _verify(broken, tmp_path)
    assert "Unknown key 'ProtectClok'" in result.stderr
    assert "Failed to parse boolean value" in result.stderr


@needs_systemd
def test_security_exposure_is_low() -> None:
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for igtv-node\.service: ([0-9.]+)", result.stdout)
    assert m, result.stdout[-2000:] + result.stderr
    assert float(m.group(1)) <= 4.0, f"exposure {m.group(1)} (systemd scale 0 safe .. 10 unsafe)"
