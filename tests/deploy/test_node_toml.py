"""deploy/node.toml loads with the node's own loader and documents every configuration key."""

from __future__ import annotations

import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from pacs_node.config import Destination, NodeConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "node.toml"


def config_keys(cls: type = NodeConfig, section: str = "") -> list[tuple[str, str]]:
    """(section, key) of every field of the config dataclasses, recursively."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str]] = []
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            out.extend(config_keys(type(value), f"{section}.{f.name}".lstrip(".")))
        else:
            out.append((section, f.name))
            if "Destination" in str(hints[f.name]):  # list of destination tables
                out.extend((section, d.name) for d in fields(Destination))
    return out


def sections(text: str) -> dict[str, str]:
    """Text of each [table] of the file ('' is the top level), comments included."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        m = re.match(r"^\[\[?([a-z_.]+)\]\]?\s*$", line)
        if m:
            current = m.group(1)
            out.setdefault(current, [])
            continue
        out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def test_example_loads_with_the_node_loader() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.listener.ae_title == "IGTV"
    assert cfg.spool.data_dir == Path("/var/lib/igtv-node")  # the systemd unit's ReadWritePaths
    assert cfg.http.host == "127.0.0.1"


def test_every_config_key_appears_in_its_section_with_a_comment() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    by_section = sections(text)
    missing = []
    for section, key in config_keys():
        body = by_section.get(section)
        if body is None or not re.search(rf"(^|[\s{{,#]){key}\s*=", body, re.MULTILINE):
            missing.append(f"[{section}] {key}" if section else key)
    assert not missing, f"keys not documented in deploy/node.toml: {missing}"
    # every active key line is directly preceded by a comment line explaining it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            assert lines[i - 1].startswith("#"), f"line {i + 1} ({line!r}) has no comment above it"


def test_defaults_in_the_example_match_the_code() -> None:
    """Keys set in the example carry the code's defaults, except the deployment paths."""
    cfg, default = load_config(EXAMPLE), NodeConfig()
    cfg.spool.data_dir = default.spool.data_dir
    cfg.listener.tls.cert = default.listener.tls.cert
    cfg.listener.tls.key = default.listener.tls.key
    assert cfg == default


def test_commented_destination_examples_are_valid(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    block = re.search(r"# --- begin destination examples\n(.*?)# --- end destination examples", text, re.S)
    assert block, "destination example block markers missing"
    uncommented = "\n".join(line[2:] for line in block.group(1).splitlines())
    active = text.replace("destinations = []\n", "", 1).replace(block.group(1), uncommented)
    path = tmp_path / "node.toml"
    path.write_text(active, encoding="utf-8")
    cfg = load_config(path)
    kinds = {d.name: d.kind for d in cfg.export.destinations}
    assert kinds == {"pacs": "dimse", "web": "dicomweb", "tps": "dimse", "archive": "dicomweb"}
    tps = next(d for d in cfg.export.destinations if d.name == "tps")
    assert (tps.ae_title, tps.port, tps.tls) == ("TPS", 2762, True)


@pytest.mark.parametrize("bad", ["[listener]\nport_typo = 1\n", "[processing]\nregister = 'sometimes'\n"])
def test_loader_rejects_what_the_example_warns_about(tmp_path: Path, bad: str) -> None:
    from pacs_node.config import ConfigError

    p = tmp_path / "bad.toml"
    p.write_text(bad)
    with pytest.raises(ConfigError):
        load_config(p)
