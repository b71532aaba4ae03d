"""The command line: every command is there, and bad input ends with a message, not a traceback."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from pacs_node.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in ("serve", "replay", "synth", "train", "evaluate", "ensemble", "grow", "echo", "version", "demo"):
        assert command in out.output


def test_version_names_node_and_python():
    out = runner.invoke(app, ["version"])
    assert out.exit_code == 0
    assert out.output.startswith("igtv-node ")
    assert "python 3." in out.output
    assert "with its 3D lesion refiner" in out.output  # shipped beside the checkpoint
    assert "with its CT-grid outline refiner" in out.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_echo_to_nobody_fails_cleanly():
    out = runner.invoke(app, ["echo", f"NOBODY@127.0.0.1:{_closed_port()}"])
    assert out.exit_code == 2
    assert "error:" in out.output and "Traceback" not in out.output


def test_malformed_echo_target_is_explained():
    out = runner.invoke(app, ["echo", "not-a-target"])
    assert out.exit_code == 2
    assert "AET@HOST:PORT" in out.output


def test_serve_with_a_broken_config_explains_and_exits(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text("[listener]\nport = 'eleven'\nbogus = true\n")
    out = runner.invoke(app, ["serve", "--config", str(cfg)])
    assert out.exit_code == 2
    assert "unknown key" in out.output


def test_serve_with_a_file_as_data_dir_explains_and_exits(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = runner.invoke(app, ["serve", "--data-dir", str(afile), "--port", "0", "--http-port", "0"])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert f"cannot use the data directory {afile}" in out.output


def test_replay_of_a_missing_folder_exits_2(tmp_path):
    out = runner.invoke(app, ["replay", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert out.exit_code == 2
    assert "not a folder" in out.output


def test_ensemble_command_combines_checkpoints_and_explains_refusals(tmp_path):
    import json

    from model.checkpoint import save_checkpoint
    from model.network import NetConfig, build_network
    from model.preprocessing import Preprocessing

    paths = []
    for seed in (1, 2):
        paths.append(save_checkpoint(tmp_path / f"m{seed}.safetensors", build_network(NetConfig(slices=3, widths=(4, 8, 8, 8))),
                                     {"preprocessing": Preprocessing(slices=3).to_dict()}))
    out = runner.invoke(app, ["ensemble", *map(str, paths), "--out", str(tmp_path / "ens.safetensors")])
    assert out.exit_code == 0, out.output
    assert len(json.loads((tmp_path / "ens.json").read_text())["members"]) == 2
    out = runner.invoke(app, ["ensemble", str(paths[0]), "--out", str(tmp_path / "one.safetensors")])
    assert out.exit_code != 0 and "at least two" in out.output


def test_synth_explains_a_malformed_number_list(tmp_path):
    out = runner.invoke(app, ["synth", str(tmp_path / "s"), "--pet-offset", "1,2"])
    assert out.exit_code == 2 and "--pet-offset needs 3 comma-separated numbers (mm), not '1,2'" in out.output
    assert not (tmp_path / "s").exists()


def test_grow_command_widens_the_decoder_and_explains_refusals(tmp_path):
    import json

    from model.checkpoint import save_checkpoint
    from model.network import NetConfig, build_network
    from model.preprocessing import Preprocessing

    src = save_checkpoint(tmp_path / "m.safetensors", build_network(NetConfig(slices=3, widths=(4, 8, 8, 8))),
                          {"preprocessing": Preprocessing(slices=3).to_dict()})
    out = runner.invoke(app, ["grow", str(src), "--decoder-widths", "16,16,8", "--refine-width", "12",
                              "--out", str(tmp_path / "g.safetensors")])
    assert out.exit_code == 0, out.output
    arch = json.loads((tmp_path / "g.json").read_text())["architecture"]
    assert arch["decoder_widths"] == [16, 16, 8] and arch["refine_width"] == 12
    out = runner.invoke(app, ["grow", str(src), "--decoder-widths", "16,16", "--refine-width", "12",
                              "--out", str(tmp_path / "h.safetensors")])
    assert out.exit_code == 2 and "three comma-separated" in out.output
    out = runner.invoke(app, ["grow", str(src), "--decoder-widths", "2,2,2", "--refine-width", "12",
                              "--out", str(tmp_path / "h.safetensors")])
    assert out.exit_code == 2 and "at least the current" in out.output and "Traceback" not in out.output


@pytest.mark.slow
def test_calibrate_command_writes_the_chosen_threshold(small_study, tmp_path):
    from model.checkpoint import shipped_checkpoint_path
    from model.predict import Predictor

    out_path = tmp_path / "calibrated.safetensors"
    out = runner.invoke(app, ["calibrate", str(small_study), "--candidates", "0.3,0.5", "--out", str(out_path)])
    assert out.exit_code == 0, out.output
    assert "(chosen)" in out.output and f"written to {out_path}" in out.output
    calibrated = Predictor.load(out_path)
    assert calibrated.threshold in (0.3, 0.5)
    assert set(calibrated.metadata["operating_point"]["candidates"]) == {"0.3", "0.5"}
    assert out_path.read_bytes() == shipped_checkpoint_path().read_bytes()
    shipped = Predictor.load(None)
    assert "with its refiners (refiner, outline)" in out.output
    assert (calibrated.refiner.digest, calibrated.outline.digest) == (shipped.refiner.digest, shipped.outline.digest)
    out = runner.invoke(app, ["calibrate", str(small_study), "--candidates", "0.3,x"])
    assert out.exit_code != 0 and "comma-separated numbers" in out.output
    out = runner.invoke(app, ["calibrate", str(small_study), "--config", str(tmp_path / "nope.toml")])
    assert out.exit_code != 0 and "does not exist" in out.output
    out = runner.invoke(app, ["evaluate", str(small_study), "--threshold", "50"])
    assert out.exit_code != 0 and "strictly between 0 and 1" in out.output
    out = runner.invoke(app, ["evaluate", str(small_study), "--config", str(tmp_path / "nope.toml")])
    assert out.exit_code != 0 and "does not exist" in out.output
