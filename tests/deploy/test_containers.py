"""Static checks of the container files (no Docker daemon is available to build them in CI)."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from pacs_node.config import load_config

ROOT = Path(__file__).resolve().parents[2]
FILES = {"cpu": ROOT / "deploy" / "Dockerfile.cpu", "cuda": ROOT / "deploy" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def args_of(path: Path, name: str) -> list[str]:
    return [rest for word, rest in instructions(path) if word == name]


def torch_pin() -> str:
    """The torch version the README's set-up command installs."""
    m = re.search(r"torch==([0-9.]+)", (ROOT / "README.md").read_text())
    assert m, "README no longer pins torch"
    return m.group(1)


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_image_runs_serve_as_non_root_with_the_example_config(kind: str) -> None:
    path = FILES[kind]
    assert args_of(path, "USER")[-1] == "igtv", "the final stage must not run as root"
    assert args_of(path, "ENTRYPOINT")[-1] == '["/opt/igtv-node/.venv/bin/igtv-node"]'
    assert args_of(path, "CMD")[-1] == '["serve", "--config", "/etc/igtv-node/node.toml"]'
    ports = " ".join(args_of(path, "EXPOSE")).split()
    cfg = load_config(ROOT / "deploy" / "node.toml")
    assert {str(cfg.listener.port), str(cfg.http.port)} <= set(ports)
    assert args_of(path, "VOLUME")[-1] == f'["{cfg.spool.data_dir}"]'
    assert any("HEALTHCHECK" == w for w, _ in instructions(path)) and "/health" in path.read_text()
    assert len(args_of(path, "FROM")) == 2, "multi-stage: build tools stay out of the runtime image"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_torch_is_pinned_to_the_project_version(kind: str) -> None:
    text = FILES[kind].read_text()
    assert f"ARG TORCH_VERSION={torch_pin()}" in text
    assert '"torch==${TORCH_VERSION}"' in text
    # the pin is inside the range pyproject.toml allows
    spec = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert torch_pin() in SpecifierSet(spec[len("torch"):])


def test_cuda_image_installs_the_cuda_extra() -> None:
    runs = " ".join(args_of(FILES["cuda"], "RUN"))
    assert '".[cuda]"' in runs and "--no-build-isolation" in runs
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    assert any(d.startswith("mamba-ssm") for d in extra)
    assert args_of(FILES["cuda"], "FROM")[0].startswith("nvidia/cuda:${CUDA_VERSION}-devel")
    assert "--gpus" in FILES["cuda"].read_text()


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_copied_sources_exist(kind: str) -> None:
    for arg in args_of(FILES[kind], "COPY"):
        if arg.startswith("--from"):
            continue
        *sources, _dest = shlex.split(arg)
        for src in sources:
            assert (ROOT / src).exists(), f"{FILES[kind].name}: COPY {src} does not exist in the repository"


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_config_edits_in_the_image_give_a_valid_config(kind: str, tmp_path: Path) -> None:
    """Run the image's sed edit of node.toml here and load the result with the node's loader."""
    run = next(r for r in args_of(FILES[kind], "RUN") if "sed -i" in r)
    sed = run.split("&&")[0].strip()
    target = tmp_path / "node.toml"
    target.write_text((ROOT / "deploy" / "node.toml").read_text())
    subprocess.run(sed.replace("/etc/igtv-node/node.toml", str(target)), shell=True, check=True)
    cfg = load_config(target)
    assert cfg.http.host == "0.0.0.0"  # reachable through the published port
    if kind == "cuda":
        assert cfg.processing.device == "auto"
