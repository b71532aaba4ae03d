"""Checkpoints: safetensors weights plus JSON metadata beside them (never pickle).

``model.safetensors`` holds the tensors; ``model.json`` holds the architecture
config, the preprocessing, a description of the training data, seed, metrics,
the version string and the SHA-256 of the weights file. Loading reads only
these two formats, so a checkpoint from elsewhere cannot run code.

An ensemble checkpoint (:func:`save_ensemble`) is the same pair: the tensors of
member ``i`` under ``members.<i>.``, and a "members" list in the metadata with
each member's architecture and provenance.

A calibrated checkpoint (:func:`save_operating_point`) also carries an
"operating_point": the probability threshold chosen on labelled studies, and
how it was chosen. Uncalibrated checkpoints operate at :data:`DEFAULT_THRESHOLD`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.ensemble import Ensemble
from model.errors import CheckpointError
from model.network import NetConfig, SimMamba, build_network
from model.operating_point import DEFAULT_THRESHOLD, is_threshold
from model.preprocessing import Preprocessing

SHIPPED_NAME = "igtv_sim_mamba.safetensors"
FORMAT = "igtv-sim-mamba/1"


def metadata_path(path: Path) -> Path:
    """The JSON metadata file beside a ``.safetensors`` checkpoint."""
    return Path(path).with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s weights to ``path`` (.safetensors) and metadata JSON beside it.

    ``metadata`` should hold "preprocessing" (``Preprocessing.to_dict()``), and may
    hold "training_data", "seed", "metrics", "version"; "architecture" is taken from
    ``model.cfg`` when absent. Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint {path}: the weights file must end in .safetensors")
    meta = dict(metadata)
    if "architecture" not in meta:
        cfg = getattr(model, "cfg", None)
        if not isinstance(cfg, NetConfig):
            raise CheckpointError(f"checkpoint {path}: no architecture config to store")
        meta["architecture"] = cfg.to_dict()
    if "preprocessing" not in meta:
        raise CheckpointError(f"checkpoint {path}: metadata needs 'preprocessing'")
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    meta["format"] = FORMAT
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    digest = _sha256(tmp)
    meta["weights_sha256"] = digest
    meta.setdefault("version", f"sim-mamba-{meta['created'][:10]}-{digest[:8]}")
    tmp_json = metadata_path(path).with_name(metadata_path(path).name + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    tmp_json.replace(metadata_path(path))
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (CheckpointError when missing or unreadable)."""
    path = Path(path)
    mpath = metadata_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path}: metadata file {mpath.name} is missing beside it")
    try:
        meta = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: metadata {mpath.name} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: metadata is not an igtv-node checkpoint ({FORMAT})")
    return meta


def weights_sha256(path: Path, meta: dict[str, Any]) -> str:
    """The SHA-256 of checkpoint ``path``'s weights: the one in its metadata ``meta``, else computed."""
    return str(meta.get("weights_sha256") or _sha256(Path(path)))


def _check_weights_digest(path: Path, meta: dict[str, Any]) -> None:
    """Raise CheckpointError when the weights file differs from the SHA-256 in its metadata."""
    digest = meta.get("weights_sha256")
    if digest and digest != _sha256(path):
        raise CheckpointError(f"checkpoint {path}: weights do not match the SHA-256 in {metadata_path(path).name}")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file; anything else is refused (no unpickling)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"checkpoint {path}: only .safetensors weights are accepted (pickle-based "
            f"{path.suffix or 'files'} can run code and are never loaded)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: not a valid safetensors file ({exc})") from exc


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the network (or ensemble) from the metadata and load its weights (eval mode).

    Raises
    ------
    CheckpointError
        Missing files, a non-safetensors file, a hash mismatch between weights and
        metadata, or weights that do not fit the architecture.
    """
    path = Path(path)
    meta = read_metadata(path)
    tensors = load_weights(path)
    _check_weights_digest(path, meta)
    operating_threshold(meta)  # a bad operating point fails here, not at the first study
    model = _build(path, meta)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the architecture ({exc})") from exc
    return model.to(device).eval(), meta


def _build(path: Path, meta: dict[str, Any]) -> nn.Module:
    """The (untrained) network or ensemble the metadata describes."""
    members = meta.get("members")
    try:
        Preprocessing.from_dict(meta["preprocessing"])
        if members is not None:
            cfgs = [NetConfig.from_dict(m["architecture"]) for m in members]
        else:
            cfgs = [NetConfig.from_dict(meta["architecture"])]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad architecture/preprocessing metadata ({exc})") from exc
    k = meta["preprocessing"].get("slices")
    if any(cfg.slices != k for cfg in cfgs if k is not None):
        raise CheckpointError(f"checkpoint {path}: architecture K differs from preprocessing K={k}")
    if members is None:
        return build_network(cfgs[0])
    try:
        return Ensemble([build_network(cfg) for cfg in cfgs])
    except ValueError as exc:  # fewer than two members
        raise CheckpointError(f"checkpoint {path}: {exc}") from exc


def save_ensemble(paths: Sequence[Path], out: Path, description: str = "") -> Path:
    """Combine two or more single-network checkpoints into one ensemble checkpoint at ``out``.

    The members must share their preprocessing. Each member's architecture, version,
    training data, training recipe, initialisation and metrics are kept in the
    metadata's "members" list.
    """
    from model.refiner import refuse_refiners_beside

    if len(paths) < 2:
        raise CheckpointError(f"an ensemble needs at least two checkpoints, got {len(paths)}")
    refuse_refiners_beside(out)
    networks, metas = [], []
    for path in paths:
        network, meta = load_checkpoint(path)
        if not isinstance(network, SimMamba):
            raise CheckpointError(f"checkpoint {path}: is itself an ensemble; list its members' checkpoints instead")
        if metas and meta["preprocessing"] != metas[0]["preprocessing"]:
            raise CheckpointError(
                f"checkpoint {path}: preprocessing {meta['preprocessing']} differs from "
                f"{paths[0]}'s {metas[0]['preprocessing']}; members must read the same stacks"
            )
        networks.append(network)
        metas.append(meta)
    keep = ("architecture", "version", "training_data", "training", "init", "metrics", "seed", "weights_sha256")
    members = [{key: meta[key] for key in keep if key in meta} for meta in metas]
    return save_checkpoint(out, Ensemble(networks), {
        "preprocessing": metas[0]["preprocessing"],
        "architecture": metas[0]["architecture"],
        "members": members,
        "training_data": {"ensemble_of": [m.get("version") for m in members], "description": description},
    })


def operating_threshold(meta: dict[str, Any]) -> float:
    """The probability threshold a checkpoint was calibrated at (:data:`DEFAULT_THRESHOLD` if never).

    Raises
    ------
    CheckpointError
        An "operating_point" without a threshold strictly between 0 and 1.
    """
    point = meta.get("operating_point")
    if point is None:
        return DEFAULT_THRESHOLD
    value = point.get("threshold") if isinstance(point, dict) else None
    if not is_threshold(value):
        raise CheckpointError(f"checkpoint operating_point threshold must lie strictly between 0 and 1, got {value!r}")
    return float(value)


def save_operating_point(src: Path, out: Path, threshold: float, calibration: dict[str, Any]) -> Path:
    """Write checkpoint ``src`` to ``out`` with a calibrated probability threshold.

    The weights are copied unchanged (``out`` may be ``src``: then only the metadata
    is rewritten); the metadata gains "operating_point" = ``{"threshold": ...}`` plus
    ``calibration`` (what data chose it, and the scores of every candidate). The
    version becomes the weights' version plus ``-t<threshold>``: results carry the
    version and derive their UIDs from it, so a recalibrated model's results are new
    objects rather than silent replacements. The refiners beside ``src``
    (:func:`model.refiner.copy_refiners`) are copied beside ``out``: the threshold was
    chosen with them.
    """
    from model.refiner import copy_refiners, refuse_foreign_refiners

    src, out = Path(src), Path(out)
    if not is_threshold(threshold):
        raise CheckpointError(f"operating threshold must lie strictly between 0 and 1, got {threshold}")
    if out.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint {out}: the weights file must end in .safetensors")
    meta = read_metadata(src)
    _check_weights_digest(src, meta)
    refuse_foreign_refiners(src, out)  # before anything is written
    meta["operating_point"] = {**calibration, "threshold": float(threshold)}
    meta.setdefault("weights_version", meta.get("version", "unknown"))
    meta["version"] = f"{meta['weights_version']}-t{threshold:g}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.resolve() != src.resolve():
        tmp = out.with_name(out.name + ".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(out)
    tmp_json = metadata_path(out).with_name(metadata_path(out).name + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp_json.replace(metadata_path(out))
    copy_refiners(src, out)
    return out


def shipped_checkpoint_path() -> Path:
    """The default checkpoint shipped in ``model/weights/``."""
    return Path(__file__).resolve().parent / "weights" / SHIPPED_NAME


def shipped_checkpoint_info() -> str:
    """One line about the shipped checkpoint (for ``igtv-node version``)."""
    from model.refiner import refiner_path

    path = shipped_checkpoint_path()
    if not path.is_file():
        return f"no shipped checkpoint at {path}"
    summary = checkpoint_summary(read_metadata(path))
    if refiner_path(path).is_file():
        summary += "; with its 3D lesion refiner"
    if refiner_path(path, "outline").is_file():
        summary += "; with its CT-grid outline refiner"
    return summary


def checkpoint_summary(meta: dict[str, Any]) -> str:
    """One line describing a checkpoint from its metadata: version, kind, K, and its calibration."""
    metrics = meta.get("metrics", {})
    dice, delivered = metrics.get("val_dice"), metrics.get("val_node_dice")
    parts = [f"SIM-Mamba ensemble of {len(meta['members'])}" if meta.get("members") else "SIM-Mamba",
             f"K={meta.get('architecture', {}).get('slices', '?')}"]
    if isinstance(dice, (int, float)):
        parts.append(f"training validation Dice {dice:.3f}"
                     + (f" ({delivered:.3f} as delivered)" if isinstance(delivered, (int, float)) else ""))
    point = meta.get("operating_point")
    if point:
        score = point.get("candidates", {}).get(f"{point['threshold']:g}")
        calibrated = f"threshold {point['threshold']:g} calibrated on {point.get('studies', '?')} studies"
        if isinstance(score, (int, float)):
            calibrated += f" (mean Dice {score:.3f})"
        order = (point.get("postprocessing") or {}).get("lesion_order")
        if order:
            calibrated += f" with lesion_order {order!r}"
        parts.append(calibrated)
    else:
        parts.append("not calibrated")
    return f"{meta.get('version', '?')} ({', '.join(parts)})"
