from pathlib import Path

import pytest

from pacs_node.config import (
    ConfigError,
    Destination,
    load_config,
    parse_aet_address,
    validate_config,
)


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
        ("[processing]\nthreshold = 'high'\n", r"\[processing\] threshold must be a number, got a string"),
        ("[processing]\ndelineation_threshold = 0.0\n", "delineation_threshold must lie strictly between 0 and 1"),
        ("not toml at all [", "not valid TOML"),
        # wrong value types name the key instead of passing through
        ("[listener]\nallow_aet = 'ORTHANC'\n", r"^\[listener\] allow_aet must be a list of strings, got a string$"),
        ("[listener]\nallow_aet = ['A', 1]\n", r"\[listener\] allow_aet must be a list of strings"),
        ("[spool]\nstable_age_s = '30'\n", r"\[spool\] stable_age_s must be a number, got a string"),
        ("[listener]\nport = 'abc'\n", r"\[listener\] port must be an integer, got a string"),
        ("[listener]\nport = 104.0\n", r"\[listener\] port must be an integer, got a number"),
        ("[worker]\nworkers = true\n", r"\[worker\] workers must be an integer, got a boolean"),
        ("[spool]\njournal = 'yes'\n", r"\[spool\] journal must be true or false, got a string"),
        ("[listener.tls]\ncert = 5\n", r"\[listener.tls\] cert must be a non-empty path, got an integer"),
        ("[spool]\ndata_dir = ''\n", r"\[spool\] data_dir must be a non-empty path"),
        ("[processing]\nroi_color = [255, 0]\n", r"\[processing\] roi_color must be a list of 3 integers"),
        ("[processing]\nroi_color = [255, 0, 300]\n", "roi_color must be three integers 0-255"),
        ("[processing]\nextra = { a = 1 }\n", r"\[processing\] extra must be a table of strings"),
        ("[http]\ntoken = 123\n", r"\[http\] token must be a string, got an integer"),
        ("listener = 'x'\n", r"\[listener\] must be a table, got a string"),
        ("log_level = 'VERBOSE'\n", "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'VERBOSE'"),
        ("log_level = 20\n", "log_level must be a string, got an integer"),
        # ports: 0 (any free port) to 65535
        ("[listener]\nport = 99999\n", "listener.port must be between 0 and 65535"),
        ("[listener]\nport = -1\n", "listener.port must be between 0 and 65535"),
        ("[http]\nport = 65536\n", "http.port must be between 0 and 65535"),
        ("[export]\ncalling_ae_title = 'BACK\\\\SLASH'\n", "calling_ae_title .* is not a valid AE title"),
        # export destinations: kind, the keys each kind needs, unique names
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimse', host = 'x' }]\n",
         r"export destination 'tps': ae_title must be a valid AE title, got None"),
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimse', ae_title = 'TPS', host = 'x' }]\n",
         r"export destination 'tps': port must be between 1 and 65535, got None"),
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimse', ae_title = 'TPS', port = 104 }]\n",
         "export destination 'tps': host is required"),
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimse', ae_title = 'TPS', host = 'x', port = 0 }]\n",
         "export destination 'tps': port must be between 1 and 65535, got 0"),
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimse', ae_title = 'WAY_TOO_LONG_AE_TITLE', host = 'x', "
         "port = 104 }]\n", "export destination 'tps': ae_title must be a valid AE title"),
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimsee', ae_title = 'TPS', host = 'x', port = 104 }]\n",
         "export destination 'tps': kind must be dimse or dicomweb, got 'dimsee'"),
        ("[export]\ndestinations = [{ name = 'web', kind = 'dicomweb' }]\n",
         "export destination 'web': url must be an http:// or https:// URL, got None"),
        ("[export]\ndestinations = [{ name = 'web', kind = 'dicomweb', url = 'ftp://pacs/dicomweb' }]\n",
         "export destination 'web': url must be an http:// or https:// URL"),
        ("[export]\ndestinations = [{ name = 'web', url = 'https://pacs' }]\n", r"\[export.destinations\] kind is required"),
        ("[export]\ndestinations = [{ name = 'tps', kind = 'dimse', ae_title = 'TPS', host = 'x', port = '104' }]\n",
         r"\[export.destinations\] port must be an integer, got a string"),
        ("[export]\ndestinations = 'p=A@h:104'\n", r"\[export\] destinations must be a list of strings or tables"),
        ("[export]\ndestinations = ['p=A@h:104', 'p=https://pacs/dicomweb']\n",
         "export destination 'p' is defined twice"),
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


def test_values_of_the_right_type_are_converted(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text("log_level = 'debug'\n[spool]\nstable_age_s = 5\n[listener]\nport = 0\n"
                 "[listener.tls]\nca = ''\n[processing]\nthreshold = 0.4\nextra = { note = 'x' }\n", encoding="utf-8")
    cfg = load_config(p)
    assert cfg.spool.stable_age_s == 5.0 and isinstance(cfg.spool.stable_age_s, float)
    assert cfg.listener.port == 0  # any free port
    assert cfg.listener.tls.ca is None and cfg.processing.extra == {"note": "x"}


def test_flag_values_go_through_the_same_checks():
    """``serve`` puts flag values (--port, --http-port, --dest) into the config, then calls validate_config."""
    cfg = load_config(None)
    cfg.listener.port = 99999
    with pytest.raises(ConfigError, match=r"listener.port must be between 0 and 65535 \(0: any free port\), got 99999"):
        validate_config(cfg)
    cfg = load_config(None)
    cfg.http.port = 70000
    with pytest.raises(ConfigError, match="http.port must be between 0 and 65535"):
        validate_config(cfg)
    cfg = load_config(None)
    cfg.export.destinations = [Destination.parse("p=A@h:104"), Destination.parse("p=B@h:105")]
    with pytest.raises(ConfigError, match="export destination 'p' is defined twice"):
        validate_config(cfg)
    cfg.export.destinations = [Destination.parse("p=A@h:104"), Destination.parse("q=https://pacs/dicomweb")]
    validate_config(cfg)


def test_a_dicomweb_url_loses_its_trailing_slash_from_a_table_too(tmp_path):
    p = tmp_path / "node.toml"
    p.write_text('[export]\ndestinations = [{ name = "web", kind = "dicomweb", url = "https://pacs/dicomweb/" }]\n')
    assert load_config(p).export.destinations[0].url == "https://pacs/dicomweb"
    assert Destination.parse("web=https://pacs/dicomweb/").url == "https://pacs/dicomweb"
