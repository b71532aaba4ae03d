"""Node configuration: one TOML file parsed into typed dataclasses, CLI flags override it."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from model.operating_point import is_threshold
from pipeline.errors import IgtvError
from pipeline.settings import ProcessSettings


class ConfigError(IgtvError):
    """The configuration file or a flag is invalid."""


AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


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
            return cls(name=name, kind="dicomweb", url=target.rstrip("/"))
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
    if not AE_TITLE_RE.match(aet) or aet.strip() == "":
        raise ConfigError(f"{text!r}: AE title must be 1-16 printable characters without backslash")
    if not 0 < port < 65536:
        raise ConfigError(f"{text!r}: port {port} out of range")
    return aet, host, port


def _coerce(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    defaults = cls() if cls is not Destination else None
    for name, value in data.items():
        current = getattr(defaults, name, None) if defaults is not None else None
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}.{name}] must be a table")
            kwargs[name] = _coerce(type(current), value, f"{where}.{name}")
        elif name == "destinations":
            kwargs[name] = [
                Destination.parse(v) if isinstance(v, str) else _coerce(Destination, v, f"{where}.destinations")
                for v in value
            ]
        elif isinstance(current, Path) or name in {"data_dir", "cert", "key", "ca", "checkpoint"}:
            kwargs[name] = Path(value) if value not in (None, "") else None
        elif isinstance(current, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


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
    cfg = _coerce(NodeConfig, data, "config")
    validate_config(cfg)
    return cfg


#: Smallest listener.max_pdu accepted (bytes).
MIN_MAX_PDU = 4096


def validate_config(cfg: NodeConfig) -> None:
    """Check values that types alone cannot."""
    if not AE_TITLE_RE.match(cfg.listener.ae_title):
        raise ConfigError(f"listener.ae_title {cfg.listener.ae_title!r} is not a valid AE title")
    for aet in cfg.listener.allow_aet:
        if not AE_TITLE_RE.match(aet):
            raise ConfigError(f"listener.allow_aet entry {aet!r} is not a valid AE title")
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
    if cfg.processing.register not in {"auto", "always", "never"}:
        raise ConfigError("processing.register must be auto, always or never")
    if cfg.processing.lesion_order not in {"volume", "confidence", "uptake"}:
        raise ConfigError("processing.lesion_order must be volume, confidence or uptake")
    if cfg.processing.test_time_flips not in {"none", "lr", "lr+slices"}:
        raise ConfigError("processing.test_time_flips must be none, lr or lr+slices")
