"""Node configuration: one TOML file parsed into typed dataclasses, CLI flags override it."""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from model.operating_point import is_threshold
from pipeline.errors import IgtvError
from pipeline.settings import ProcessSettings


class ConfigError(IgtvError):
    """The configuration file or a flag is invalid."""


AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


def is_ae_title(text: str) -> bool:
    """Whether ``text`` is a usable AE title: 1-16 printable characters, no backslash, not all spaces."""
    return AE_TITLE_RE.fullmatch(text) is not None and text.strip() != ""


@dataclass
class TlsConfig:
    """DICOM TLS settings (TLS 1.2 minimum)."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


@dataclass
class ListenerConfig:
    """DIMSE listener."""

    ae_title: str = "IGTV"
    host: str = "0.0.0.0"
    port: int = 11112
    allow_aet: list[str] = field(default_factory=list)
    require_called_aet: bool = True  # reject associations not addressed to ae_title
    max_pdu: int = 262144
    max_instance_mb: float = 512.0
    max_instances_per_study: int = 5000
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass
class HttpConfig:
    """HTTP server: STOW-RS, dashboard, metrics, health."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None


@dataclass
class SpoolConfig:
    """Where received data lives and when a study counts as complete."""

    data_dir: Path = Path("./igtv-data")
    stable_age_s: float = 30.0
    min_free_mb: float = 500.0
    # Acknowledge once an instance is flushed to the ack journal (one fdatasync), the spool
    # file and index row following in the background; false: the spool file and its folder
    # are flushed before each acknowledgement (two flushes). Both are durable.
    journal: bool = True
    journal_segment_mb: int = 16  # journal segment size (preallocated, reused); at most 16 segments


@dataclass
class Destination:
    """Where results are sent: DIMSE (``AET@HOST:PORT``) or DICOMweb (``https://.../dicomweb``)."""

    name: str
    kind: str  # "dimse" or "dicomweb"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    token: str | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        if self.url:  # STOW-RS posts to <url>/studies
            self.url = self.url.rstrip("/")

    @classmethod
    def parse(cls, spec: str) -> Destination:
        """Parse ``NAME=AET@HOST:PORT`` or ``NAME=http(s)://...``."""
        if "=" not in spec:
            raise ConfigError(f"destination {spec!r}: expected NAME=AET@HOST:PORT or NAME=URL")
        name, target = spec.split("=", 1)
        name = name.strip()
        if not name:
            raise ConfigError(f"destination {spec!r}: empty name")
        if target.startswith(("http://", "https://")):
            return cls(name=name, kind="dicomweb", url=target)
        aet, host, port = parse_aet_address(target)
        return cls(name=name, kind="dimse", ae_title=aet, host=host, port=port)


@dataclass
class ExportConfig:
    """Result export and its retry policy."""

    destinations: list[Destination] = field(default_factory=list)
    calling_ae_title: str | None = None  # defaults to the listener's AE title
    max_attempts: int = 6
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    timeout_s: float = 30.0
    tls: TlsConfig = field(default_factory=TlsConfig)  # CA / client cert for destinations with tls = true


@dataclass
class WorkerConfig:
    """Job execution."""

    workers: int = 1
    torch_threads: int = 0  # 0: let torch decide
    process_function: str = "pipeline.process:process_study"  # module:function run per study


@dataclass
class NodeConfig:
    """Everything ``igtv-node serve`` needs."""

    listener: ListenerConfig = field(default_factory=ListenerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    processing: ProcessSettings = field(default_factory=ProcessSettings)
    log_level: str = "INFO"


def parse_aet_address(text: str) -> tuple[str, str, int]:
    """Parse ``AET@HOST:PORT`` into its parts, validating each."""
    m = re.match(r"^([^@]+)@(\[[^\]]+\]|[^:]+):(\d+)$", text.strip())
    if not m:
        raise ConfigError(f"{text!r}: expected AET@HOST:PORT")
    aet, host, port = m.group(1), m.group(2).strip("[]"), int(m.group(3))
    if not is_ae_title(aet):
        raise ConfigError(f"{text!r}: AE title must be 1-16 printable characters without backslash")
    if not 0 < port < 65536:
        raise ConfigError(f"{text!r}: port {port} out of range")
    return aet, host, port


def _kind(value: Any) -> str:
    """How a TOML value is named in messages: "a string", "an integer", "a list", ..."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return names.get(type(value), f"a {type(value).__name__}")


def _typed(value: Any, hint: Any, key: str) -> Any:
    """Check a TOML ``value`` against the field type ``hint`` and convert it (Path from str, tuple from list).

    Handles bool, int, float (an int is accepted), str, Path, ``X | None``, ``list[str]``,
    ``dict[str, str]`` and tuples of ints. An empty string gives None for an optional Path.

    Raises
    ------
    ConfigError
        When ``value`` does not fit; the message names ``key``.
    """
    optional = type(None) in get_args(hint)
    if optional:
        hint = next(a for a in get_args(hint) if a is not type(None))
    origin, args = get_origin(hint), get_args(hint)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if hint is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, want = is_int, "an integer"
    elif hint is float:
        ok, want = is_int or isinstance(value, float), "a number"
        value = float(value) if ok else value
    elif hint is str:
        ok, want = isinstance(value, str), "a string"
    elif hint is Path:
        ok, want = isinstance(value, str) and (optional or value != ""), "a non-empty path"
        value = (Path(value) if value else None) if ok else value
    elif origin is list and args == (str,):
        ok, want = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    elif origin is dict and args == (str, str):
        ok, want = isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), "a table of strings"
    elif origin is tuple and set(args) == {int}:
        ok = isinstance(value, list) and len(value) == len(args) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = f"a list of {len(args)} integers"
        value = tuple(value) if ok else value
    else:
        raise TypeError(f"{key}: no config check for type {hint!r}")
    if not ok:
        raise ConfigError(f"{key} must be {want}, got {_kind(value)}")
    return value


def _coerce(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from the TOML table ``[where]`` ("" is the top level).

    Unknown keys, missing required keys and values of the wrong type raise :class:`ConfigError`.
    """
    section = f"[{where}] " if where else ""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{section}unknown key(s) {sorted(unknown)}")
    missing = [f.name for f in known.values()
               if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"{section}{missing[0]} is required")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint, key, sub = hints[name], f"{section}{name}", f"{where}.{name}".lstrip(".")
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"[{sub}] must be a table, got {_kind(value)}")
            kwargs[name] = _coerce(hint, value, sub)
        elif name == "destinations":
            if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
                raise ConfigError(f"{key} must be a list of strings or tables, got {_kind(value)}")
            kwargs[name] = [
                Destination.parse(v) if isinstance(v, str) else _coerce(Destination, v, sub)
                for v in value
            ]
        else:
            kwargs[name] = _typed(value, hint, key)
    return cls(**kwargs)


def load_config(path: Path | None) -> NodeConfig:
    """Read ``path`` (TOML) into a :class:`NodeConfig`; None gives the defaults."""
    if path is None:
        return NodeConfig()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    cfg = _coerce(NodeConfig, data)
    validate_config(cfg)
    return cfg


#: Smallest listener.max_pdu accepted (bytes).
MIN_MAX_PDU = 4096


def validate_destinations(destinations: list[Destination]) -> None:
    """Check each destination's kind and the keys its kind needs, and that names are unique."""
    seen: set[str] = set()
    for d in destinations:
        what = f"export destination {d.name!r}"
        if not d.name.strip():
            raise ConfigError("export destination name must not be empty")
        if d.name in seen:
            raise ConfigError(f"{what} is defined twice: destination names must be unique")
        seen.add(d.name)
        if d.kind == "dimse":
            if d.ae_title is None or not is_ae_title(d.ae_title):
                raise ConfigError(f"{what}: ae_title must be a valid AE title, got {d.ae_title!r}")
            if not (d.host or "").strip():
                raise ConfigError(f"{what}: host is required for kind dimse")
            if d.port is None or not 1 <= d.port <= 65535:
                raise ConfigError(f"{what}: port must be between 1 and 65535, got {d.port!r}")
        elif d.kind == "dicomweb":
            url = urlsplit(d.url or "")
            if url.scheme not in {"http", "https"} or not url.netloc:
                raise ConfigError(f"{what}: url must be an http:// or https:// URL, got {d.url!r}")
        else:
            raise ConfigError(f"{what}: kind must be dimse or dicomweb, got {d.kind!r}")


def validate_config(cfg: NodeConfig) -> None:
    """Check values that types alone cannot (also after command-line flags override the file)."""
    if cfg.log_level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {cfg.log_level!r}")
    if not is_ae_title(cfg.listener.ae_title):
        raise ConfigError(f"listener.ae_title {cfg.listener.ae_title!r} is not a valid AE title")
    for aet in cfg.listener.allow_aet:
        if not is_ae_title(aet):
            raise ConfigError(f"listener.allow_aet entry {aet!r} is not a valid AE title")
    for key, port in (("listener.port", cfg.listener.port), ("http.port", cfg.http.port)):
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key} must be between 0 and 65535 (0: any free port), got {port}")
    calling = cfg.export.calling_ae_title
    if calling is not None and not is_ae_title(calling):
        raise ConfigError(f"export.calling_ae_title {calling!r} is not a valid AE title")
    validate_destinations(cfg.export.destinations)
    if cfg.listener.max_pdu < MIN_MAX_PDU:
        raise ConfigError(f"listener.max_pdu must be at least {MIN_MAX_PDU} bytes, got {cfg.listener.max_pdu} "
                          f"(0, unlimited, is not offered: the node bounds what a peer may send)")
    if cfg.spool.stable_age_s < 0:
        raise ConfigError("spool.stable_age_s must be >= 0")
    if not 1 <= cfg.spool.journal_segment_mb <= 1024:
        raise ConfigError("spool.journal_segment_mb must be between 1 and 1024")
    if cfg.listener.tls.enabled and not (cfg.listener.tls.cert and cfg.listener.tls.key):
        raise ConfigError("listener.tls.enabled needs listener.tls.cert and listener.tls.key")
    threshold = cfg.processing.threshold
    if threshold is not None and not is_threshold(threshold):
        raise ConfigError(f"processing.threshold must lie strictly between 0 and 1, got {threshold!r}")
    outline = cfg.processing.delineation_threshold
    if outline is not None and not is_threshold(outline):
        raise ConfigError(f"processing.delineation_threshold must lie strictly between 0 and 1, got {outline!r}")
    if not all(0 <= c <= 255 for c in cfg.processing.roi_color):
        raise ConfigError(f"processing.roi_color must be three integers 0-255, got {list(cfg.processing.roi_color)}")
    if cfg.processing.register not in {"auto", "always", "never"}:
        raise ConfigError("processing.register must be auto, always or never")
    if cfg.processing.lesion_order not in {"volume", "confidence", "uptake"}:
        raise ConfigError("processing.lesion_order must be volume, confidence or uptake")
    if cfg.processing.test_time_flips not in {"none", "lr", "lr+slices"}:
        raise ConfigError("processing.test_time_flips must be none, lr or lr+slices")
