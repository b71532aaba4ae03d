"""Growing the decoder keeps the network's output and trains the new channels."""

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import CheckpointError
from model.grow import grow_checkpoint, grow_decoder
from model.network import NetConfig, build_network
from model.refiner import LesionRefiner, save_refiner

CFG = NetConfig(slices=3, widths=(4, 8, 8, 8), d_state=4)


def _trained_like(cfg: NetConfig = CFG) -> torch.nn.Module:
    """A network whose BatchNorm statistics and weights are not at their defaults."""
    torch.manual_seed(3)
    net = build_network(cfg)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
            if name.endswith("running_var"):
                t.abs_().add_(0.5)
    return net.eval()


def test_grown_network_gives_the_same_output():
    net = _trained_like()
    grown = grow_decoder(net, (12, 16, 8), 12)
    assert grown.cfg.decoder == (12, 16, 8) and grown.cfg.refine_width == 12
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in net.parameters())
    x = torch.randn(2, 2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), net(x), atol=1e-5, rtol=1e-5)


def test_new_channels_receive_gradients():
    grown = grow_decoder(_trained_like(), (8, 16, 8), 8).train()
    loss = grown(torch.randn(2, 2, 3, 32, 32)).square().mean()
    loss.backward()
    w = grown.refine[1].weight.grad  # the outgoing weights of the new refinement channels start at zero
    assert w[:, 4:].abs().sum() > 0  # ... and training moves them


def test_growing_narrower_is_refused():
    with pytest.raises(ValueError, match="at least the current"):
        grow_decoder(_trained_like(), (8, 8, 2), 8)


def test_default_decoder_widths_stay_out_of_the_metadata():
    assert "decoder_widths" not in CFG.to_dict()
    grown_cfg = NetConfig(slices=3, widths=(4, 8, 8, 8), d_state=4, decoder_widths=(8, 8, 8))
    assert NetConfig.from_dict(grown_cfg.to_dict()) == grown_cfg
    with pytest.raises(ValueError, match="three positive"):
        NetConfig(decoder_widths=(8, 8))


def test_command_writes_a_loadable_checkpoint_with_a_new_version(tmp_path):
    net = _trained_like()
    src = save_checkpoint(tmp_path / "m.safetensors", net, {"preprocessing": {"slices": 3}, "seed": 1,
                                                              "operating_point": {"threshold": 0.3}})
    out = tmp_path / "grown.safetensors"
    grow_checkpoint(src, out, (8, 8, 8), 8)
    grown, meta = load_checkpoint(out)
    _, old_meta = load_checkpoint(src)
    assert meta["version"] != old_meta["version"]
    assert meta["grown_from"]["version"] == old_meta["version"]
    assert "operating_point" not in meta and meta["architecture"]["decoder_widths"] == [8, 8, 8]
    x = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), net(x), atol=1e-5, rtol=1e-5)


def test_default_decoder_matches_the_encoder_widths():
    assert NetConfig(widths=(8, 16, 32, 64)).decoder == (32, 16, 8)


def test_growing_a_checkpoint_narrower_is_a_checkpoint_error(tmp_path):
    src = save_checkpoint(tmp_path / "m.safetensors", _trained_like(), {"preprocessing": {"slices": 3}})
    with pytest.raises(CheckpointError, match="at least the current"):
        grow_checkpoint(src, tmp_path / "g.safetensors", (2, 8, 4), 8)


def test_a_grown_network_is_not_written_where_refiners_of_another_lie(tmp_path):
    src = save_checkpoint(tmp_path / "m.safetensors", _trained_like(), {"preprocessing": {"slices": 3}})
    out = tmp_path / "grown.safetensors"
    save_refiner(LesionRefiner(), out, {}, network_sha256="ab" * 32)
    with pytest.raises(CheckpointError, match="grown.refiner.safetensors beside it learned from the network there"):
        grow_checkpoint(src, out, (8, 8, 8), 8)
    assert not out.exists()
