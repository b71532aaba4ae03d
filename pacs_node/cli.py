"""The ``igtv-node`` command line (typer).

Each command parses its flags, builds typed settings and calls one function
in the module that owns the work; heavy imports (torch, SimpleITK) happen
inside the commands, so ``--help`` and flag errors answer at once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from pacs_node import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="igtv-node: a DICOM node that segments the lung IGTV on PET/CT and returns DICOM-SEG and RTSTRUCT.",
)

log = logging.getLogger("igtv_node")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Third-party libraries narrate every attribute they copy or PDU they see at INFO;
    # keep them to warnings unless the operator asked for DEBUG.
    if logging.getLogger().level > logging.DEBUG:
        for name in ("highdicom", "pynetdicom"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _fail(exc: Exception) -> None:
    """Print an expected error without a stack trace and exit 2."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _comma_values(text: str, count: int, convert: Callable[[str], float], error: str) -> tuple:
    """``text`` split at commas into exactly ``count`` converted values; otherwise exit with ``error``."""
    try:
        values = tuple(convert(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        _fail(ValueError(error))
    return values


@app.command()
def version() -> None:
    """Print the versions of igtv-node and of the shipped model."""
    typer.echo(f"igtv-node {__version__}")
    try:
        from model.checkpoint import shipped_checkpoint_info

        info = shipped_checkpoint_info()
        typer.echo(f"model {info}")
    except ImportError:
        typer.echo("model: not built yet")
    except Exception as exc:  # the version command must always answer
        typer.echo(f"model: unavailable ({exc})")
    typer.echo(f"python {sys.version.split()[0]}")


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write studies into (one sub-folder per study)."),
    seed: int = typer.Option(0, help="Seed of the first study; study i uses seed + i."),
    cases: int = typer.Option(1, help="Number of studies to generate."),
    motion: str = typer.Option("breathing", help="'breathing' (IGTV studies) or 'static' (GTV studies for pre-training)."),
    small: bool = typer.Option(False, help="Reduced-size studies (fast, for tests)."),
    amplitude: float | None = typer.Option(None, help="Tumour SI breathing amplitude in mm (default: drawn per lobe)."),
    amplitude_range: str | None = typer.Option(None, help="Draw the SI amplitude from 'LOW,HIGH' mm for every lobe."),
    diameter: float | None = typer.Option(None, help="Tumour diameter in mm (default: drawn, 5-60)."),
    diameter_range: str | None = typer.Option(None, help="Draw the tumour diameter log-uniformly from 'LOW,HIGH' mm."),
    lesions: int = typer.Option(1, help="Number of lung tumours."),
    lymph_nodes: bool = typer.Option(True, help="Add mediastinal/hilar lymph nodes (some FDG-avid)."),
    feet_first: bool = typer.Option(False, help="Patient position FFS instead of HFS."),
    compress: str | None = typer.Option(None, help="Pixel data compression: rle or jpeg2000."),
    pet_offset: str | None = typer.Option(None, help="PET geometry offset 'X,Y,Z' in mm (own frame of reference)."),
    pet_slice: float | None = typer.Option(None, help="PET slice spacing in mm."),
    workers: int = typer.Option(1, help="Processes generating studies in parallel (about 0.7 GB each)."),
) -> None:
    """Generate synthetic thorax PET/CT studies as DICOM files with GTV/IGTV truth."""
    from pipeline.errors import IgtvError
    from pipeline.synth.generate import SynthOptions, generate_studies

    _setup_logging("WARNING")
    try:
        def numbers(text: str | None, count: int, flag: str) -> tuple[float, ...] | None:
            if not text:
                return None
            return _comma_values(text, count, float, f"{flag} needs {count} comma-separated numbers (mm), not {text!r}")

        offset = numbers(pet_offset, 3, "--pet-offset") or (0.0, 0.0, 0.0)
        options = SynthOptions(
            motion=motion, small=small, amplitude_mm=amplitude, diameter_mm=diameter, n_lesions=lesions,
            amplitude_range_mm=numbers(amplitude_range, 2, "--amplitude-range"),
            diameter_range_mm=numbers(diameter_range, 2, "--diameter-range"),
            lymph_nodes=lymph_nodes, feet_first=feet_first, compress=compress, pet_offset_mm=offset,
            pet_slice_mm=pet_slice,
        )
        paths = generate_studies(out, seed=seed, cases=cases, options=options, progress=True, workers=workers)
    except IgtvError as exc:
        _fail(exc)
    for p in paths:
        typer.echo(str(p))


@app.command()
def replay(
    study_dir: Path = typer.Argument(..., help="Folder of DICOM files of one study (searched recursively)."),
    out: Path = typer.Option(Path("igtv-results"), "--out", help="Folder for SEG, RTSTRUCT, preview and report."),
    dest: list[str] = typer.Option([], "--dest", help="Send results to NAME=AET@HOST:PORT or NAME=URL (repeatable)."),
    config: Path | None = typer.Option(None, "--config", help="node.toml"),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint (.safetensors); default: the shipped model."),
) -> None:
    """Run the worker path on a folder, without a listener."""
    from pacs_node.replay import run_replay
    from pipeline.errors import IgtvError

    try:
        from pacs_node.config import load_config

        cfg = load_config(config)
        _setup_logging(cfg.log_level)
        if checkpoint is not None:
            cfg.processing.checkpoint = checkpoint
        code = run_replay(study_dir, out, dest, cfg)
    except IgtvError as exc:
        _fail(exc)
    raise typer.Exit(code=code)


@app.command()
def demo(
    out: Path = typer.Option(Path("igtv-demo"), "--out", help="Folder for the synthetic study and the results."),
    seed: int = typer.Option(1234, help="Seed of the synthetic study."),
) -> None:
    """The embedded default: synthesise one PET/CT study and replay it through the whole pipeline."""
    from pacs_node.config import NodeConfig
    from pacs_node.replay import run_replay
    from pipeline.errors import IgtvError
    from pipeline.synth.generate import SynthOptions, generate_studies

    _setup_logging("INFO")
    try:
        typer.echo(f"Synthesising a thorax PET/CT study (seed {seed}) ...")
        (study,) = generate_studies(out / "studies", seed=seed, cases=1, options=SynthOptions(), progress=True)
        typer.echo(f"Study written to {study}")
        code = run_replay(study, out / "results", [], NodeConfig())
    except IgtvError as exc:
        _fail(exc)
    if code == 0:
        typer.echo(f"Results in {(out / 'results').resolve()}")
    raise typer.Exit(code=code)


@app.command()
def serve(
    port: int | None = typer.Option(None, help="DIMSE port (default 11112)."),
    ae_title: str | None = typer.Option(None, "--ae-title", help="Our AE title (default IGTV)."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Spool, index and results (default ./igtv-data)."),
    stable_age: float | None = typer.Option(None, "--stable-age", help="Seconds without new instances before a study is complete (default 30)."),
    dest: list[str] = typer.Option([], "--dest", help="NAME=AET@HOST:PORT or NAME=https://host/dicomweb (repeatable)."),
    http_port: int | None = typer.Option(None, "--http-port", help="STOW-RS, dashboard and metrics port (default 8080)."),
    allow_aet: list[str] = typer.Option([], "--allow-aet", help="Accept only these calling AE titles (repeatable)."),
    config: Path | None = typer.Option(None, "--config", help="node.toml; flags override it."),
) -> None:
    """Run the node: DIMSE and DICOMweb listeners, study completion, workers, export."""
    from pacs_node.config import load_config
    from pacs_node.server import run_server
    from pipeline.errors import IgtvError

    try:
        cfg = load_config(config)
        from pacs_node.config import Destination, validate_config

        if port is not None:
            cfg.listener.port = port
        if ae_title is not None:
            cfg.listener.ae_title = ae_title
        if data_dir is not None:
            cfg.spool.data_dir = data_dir
        if stable_age is not None:
            cfg.spool.stable_age_s = stable_age
        if http_port is not None:
            cfg.http.port = http_port
        if allow_aet:
            cfg.listener.allow_aet = list(allow_aet)
        if dest:
            cfg.export.destinations = [Destination.parse(d) for d in dest]
        validate_config(cfg)
        _setup_logging(cfg.log_level)
        run_server(cfg)
    except IgtvError as exc:
        _fail(exc)


@app.command()
def echo(
    target: str = typer.Argument(..., help="AET@HOST:PORT"),
    ae_title: str = typer.Option("IGTV", "--ae-title", help="Our calling AE title."),
) -> None:
    """C-ECHO a DICOM peer and report the round-trip time."""
    from pacs_node.export import echo_peer
    from pipeline.errors import IgtvError

    try:
        ms = echo_peer(target, calling_ae=ae_title)
    except IgtvError as exc:
        _fail(exc)
    typer.echo(f"C-ECHO {target}: success in {ms:.1f} ms")


@app.command()
def train(
    data: list[Path] = typer.Argument(..., help="Folders of labelled DICOM studies (searched recursively)."),
    out: Path = typer.Option(..., "--out", help="Output checkpoint (.safetensors; metadata JSON beside it)."),
    roi: list[str] = typer.Option(["IGTV", "ITV"], "--roi", help="RTSTRUCT ROI name(s) or SEG segment label(s) of the target, case-insensitive."),
    init: Path | None = typer.Option(None, "--init", help="Start from this checkpoint (transfer learning)."),
    freeze: list[str] = typer.Option([], "--freeze", help="Encoder stages to freeze when fine-tuning (e.g. stem, stage1)."),
    epochs: int = typer.Option(30, help="Training epochs."),
    seed: int = typer.Option(0, help="Random seed."),
    cache: Path = typer.Option(Path(".cache/samples"), help="Preprocessed-sample cache."),
    val_fraction: float = typer.Option(0.2, help="Fraction of studies held out for validation."),
    resume: bool = typer.Option(False, help="Resume from the last epoch checkpoint of --out."),
    device: str = typer.Option("cpu", help="Where to train: cpu, cuda or auto."),
    workers: int = typer.Option(1, help="Processes preparing uncached studies (about 1.5 GB each)."),
    batch_size: int = typer.Option(8, help="Patches per optimiser step."),
    patch: int = typer.Option(64, help="Training patch size in model-grid pixels."),
    samples_per_epoch: int = typer.Option(400, help="Patches drawn per epoch."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default 2e-3, or 1e-3 with --init)."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    dice_loss: str = typer.Option("batch", help="Soft Dice over the whole batch ('batch') or per target patch ('sample': small tumours weigh as much as large ones)."),
    mine_every: int = typer.Option(0, help="Every N epochs, draw half the hard negatives at the model's own false positives on the training studies (0 = off)."),
    labels: str = typer.Option("majority", help="Model-grid targets: 'majority' (0/1 by majority of each 2 mm pixel's CT pixels) or 'area' (the fraction of the pixel inside the label: sub-pixel boundaries; measured no better, see the model card)."),
    envelope_weight: float = typer.Option(1.0, help="BCE weight of target pixels where the CT shows lung (the breathing envelope only the PET marks); 1 = no extra weight."),
    misregister_px: float = typer.Option(2.0, help="Augmentation: shift the PET against the CT by up to this many model pixels (2 mm each) to simulate misregistration; 0 = off."),
    slice_step: int | None = typer.Option(None, help="CT slices between the K slices of a stack (1 = adjacent; 2 sees twice as far along the breathing axis). Default: the --init checkpoint's, else 1. Changing it keeps K, so the weights still fit."),
    select_by: str = typer.Option("delivered", help="Best epoch by 'delivered' (Dice of the lesion the node delivers after its default post-processing, found at 0.35 and outlined at 0.5) or 'raw' (whole-crop Dice of the probabilities at 0.5, as before session 10)."),
) -> None:
    """Train or fine-tune the SIM-Mamba model on labelled studies."""
    from pipeline.errors import IgtvError
    from pipeline.training import TrainRequest, run_training

    _setup_logging("INFO")
    try:
        run_training(
            TrainRequest(
                data=list(data), out=out, roi_names=list(roi), init=init, freeze=list(freeze),
                epochs=epochs, seed=seed, cache=cache, val_fraction=val_fraction, resume=resume,
                device=device, workers=workers, batch_size=batch_size, patch=patch,
                samples_per_epoch=samples_per_epoch, lr=lr, threads=threads, dice=dice_loss, mine_every=mine_every,
                labels=labels, envelope_weight=envelope_weight, misregister_px=misregister_px, slice_step=slice_step,
                select_by=select_by,
            )
        )
    except IgtvError as exc:
        _fail(exc)


@app.command()
def ensemble(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more checkpoints trained with the same preprocessing."),
    out: Path = typer.Option(..., "--out", help="Ensemble checkpoint to write (.safetensors; metadata JSON beside it)."),
    description: str = typer.Option("", help="Free text stored in the ensemble's metadata."),
) -> None:
    """Combine checkpoints into one ensemble that averages their probabilities."""
    from model.checkpoint import save_ensemble
    from pipeline.errors import IgtvError

    try:
        path = save_ensemble(list(checkpoints), out, description)
    except IgtvError as exc:
        _fail(exc)
    typer.echo(f"ensemble of {len(checkpoints)} written to {path}")


@app.command()
def grow(
    checkpoint: Path = typer.Argument(..., help="Trained single-network checkpoint."),
    out: Path = typer.Option(..., "--out", help="Grown checkpoint to write (.safetensors; metadata JSON beside it)."),
    decoder_widths: str = typer.Option(..., help="Decoder channels at 1/8, 1/4 and 1/2 resolution, e.g. 64,48,32; "
                                                  "each at least the current one."),
    refine_width: int = typer.Option(..., help="Channels of the full-resolution refinement head."),
    seed: int = typer.Option(0, help="Seed of the new channels' random incoming weights."),
) -> None:
    """Widen a trained network's decoder without changing its output, for further training (--init)."""
    from model.grow import grow_checkpoint
    from pipeline.errors import IgtvError

    widths = _comma_values(decoder_widths, 3, int, "--decoder-widths needs three comma-separated integers "
                           f"(1/8, 1/4, 1/2), got {decoder_widths!r}")
    try:
        path = grow_checkpoint(checkpoint, out, widths, refine_width, seed)  # type: ignore[arg-type]
    except IgtvError as exc:
        _fail(exc)
    typer.echo(f"grown network written to {path}; train it with --init, then calibrate it")


@app.command()
def evaluate(
    data: list[Path] = typer.Argument(..., help="Folders of labelled DICOM studies."),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint; default the shipped model."),
    roi: list[str] = typer.Option(["IGTV", "ITV"], "--roi", help="Target ROI name(s)."),
    baselines: bool = typer.Option(True, help="Also run the SUV-40% baseline."),
    out: Path | None = typer.Option(None, "--out", help="Write per-case results as JSON here."),
    threshold: float | None = typer.Option(None, help="Probability threshold; default the checkpoint's calibrated one."),
    config: Path | None = typer.Option(None, "--config", help="node.toml whose [processing] post-processing "
                                                              "(keep, order, outline, flips, ...) to evaluate under; "
                                                              "default the built-in one."),
    device: str = typer.Option("cpu", help="Where the network runs: cpu, cuda or auto."),
) -> None:
    """Per-case Dice, HD95 and volume ratio on the original CT grid."""
    from pacs_node.config import load_config
    from pipeline.errors import IgtvError
    from pipeline.evaluation import run_evaluation

    _setup_logging("WARNING")
    try:
        settings = load_config(config).processing if config is not None else None
        run_evaluation(list(data), checkpoint=checkpoint, roi_names=list(roi), baselines=baselines, out=out,
                       threshold=threshold, device=device, settings=settings)
    except (IgtvError, ValueError) as exc:
        _fail(exc)


@app.command()
def calibrate(
    data: list[Path] = typer.Argument(..., help="Folders of labelled DICOM studies not used in training."),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint to calibrate; default the shipped model."),
    candidates: str | None = typer.Option(None, "--candidates", help="Comma-separated probability thresholds to "
                                                                     "try; default 0.2 to 0.6 in steps of 0.05."),
    roi: list[str] = typer.Option(["IGTV", "ITV"], "--roi", help="Target ROI name(s)."),
    out: Path | None = typer.Option(None, "--out", help="Write the checkpoint with the chosen threshold here "
                                                        "(may be the checkpoint itself); without it, only report."),
    config: Path | None = typer.Option(None, "--config", help="node.toml whose [processing] post-processing "
                                                              "(keep, order, flips, ...) to calibrate under; default "
                                                              "the built-in one."),
    device: str = typer.Option("cpu", help="Where the network runs: cpu, cuda or auto."),
) -> None:
    """Choose the probability threshold with the best mean Dice on labelled studies."""
    from model.checkpoint import save_operating_point, shipped_checkpoint_path
    from model.refiner import refiners_beside
    from pacs_node.config import load_config
    from pipeline.calibration import DEFAULT_CANDIDATES
    from pipeline.calibration import calibrate as run_calibration
    from pipeline.errors import IgtvError

    _setup_logging("WARNING")
    try:
        values = list(DEFAULT_CANDIDATES) if candidates is None else [float(v) for v in candidates.split(",") if v.strip()]
    except ValueError:
        _fail(ValueError(f"--candidates needs comma-separated numbers, not {candidates!r}"))
    try:
        settings = load_config(config).processing if config is not None else None
        result = run_calibration(list(data), checkpoint=checkpoint, candidates=values, roi_names=list(roi),
                                 settings=settings, device=device)
        typer.echo(result.table())
        if out is not None:
            source = checkpoint if checkpoint is not None else shipped_checkpoint_path()
            save_operating_point(source, out, result.chosen, result.record())
            kinds = refiners_beside(out)
            typer.echo(f"threshold {result.chosen:g} written to {out}"
                       + (f" with its refiners ({', '.join(kinds)})" if kinds else ""))
    except (IgtvError, ValueError) as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
