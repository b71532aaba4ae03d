from pathlib import Path

import pytest

from pacs_node.config import ConfigError, Destination, load_config, parse_aet_address


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.listener.ae_title == "IGTV"
    assert cfg.listener.port == 11112
    assert cfg.spool.data_dir == Path("./igtv-data")
    assert cfg.spool.stable_age_s == 30
    assert cfg.processing.roi_name == "IGTV"
    assert cfg.processing.threshold is None  # the checkpoint's calibrated threshold


def test_toml_overrides_nested_sections(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text(
        """
log_level = "DEBUG"
[listener]
ae_title = "IGTV_TEST"
port = 104
allow_aet = ["PACS1", "SCANNER"]
[listener.tls]
enabled = true
cert = "/etc/igtv/cert.pem"
key = "/etc/igtv/key.pem"
[spool]
data_dir = "/var/lib/igtv"
stable_age_s = 5
[export]
destinations = ["pacs=ORTHANC@127.0.0.1:4242", {name = "web", kind = "dicomweb", url = "https://pacs/dicomweb", token = "t"}]
[processing]
threshold = 0.35
roi_name = "ITV_AI"
roi_color = [0, 255, 0]
""",
        encoding="utf-8",
    )
    cfg = load_config(p)
    assert cfg.log_level == "DEBUG"
    assert cfg.listener.ae_title == "IGTV_TEST" and cfg.listener.port == 104
    assert cfg.listener.allow_aet == ["PACS1", "SCANNER"]
    assert cfg.listener.tls.enabled and cfg.listener.tls.cert == Path("/etc/igtv/cert.pem")
    assert cfg.spool.data_dir == Path("/var/lib/igtv") and cfg.spool.stable_age_s == 5
    dimse, web = cfg.export.destinations
    assert (dimse.kind, dimse.ae_title, dimse.host, dimse.port) == ("dimse", "ORTHANC", "127.0.0.1", 4242)
    assert (web.kind, web.url, web.token) == ("dicomweb", "https://pacs/dicomweb", "t")
    assert cfg.processing.roi_name == "ITV_AI" and cfg.processing.roi_color == (0, 255, 0)
    assert cfg.processing.threshold == 0.35


@pytest.mark.parametrize(
    "text, message",
    [
        ("[listener]\nbogus = 1\n", "unknown key"),
        ("[listener]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "not a valid AE title"),
        ("[listener.tls]\nenabled = true\n", "needs listener.tls.cert"),
        ("[listener]\nmax_pdu = 0\n", "max_pdu must be at least 4096"),
        ("[processing]\nregister = 'sometimes'\n", "register must be"),
        ("[processing]\nthreshold = 1.5\n", "threshold must lie strictly between 0 and 1"),
        ("[processing]\nthreshold = 'high'\n", "threshold must lie strictly between 0 and 1"),
        ("[processing]\ndelineation_threshold = 0.0\n", "delineation_threshold must lie strictly between 0 and 1"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, message):
    p = tmp_path / "node.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_destination_parsing():
    d = Destination.parse("pacs=STORESCP@localhost:11113")
    assert (d.name, d.ae_title, d.host, d.port) == ("pacs", "STORESCP", "localhost", 11113)
    w = Destination.parse("cloud=https://example.org/dicomweb/")
    assert w.kind == "dicomweb" and w.url == "https://example.org/dicomweb"
    for bad in ["nohost", "x=AE@host", "x=AE@host:70000", "x=@host:104", "=AE@h:1"]:
        with pytest.raises(ConfigError):
            Destination.parse(bad)
    assert parse_aet_address("AE@[::1]:104") == ("AE", "::1", 104)
