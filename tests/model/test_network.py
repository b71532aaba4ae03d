"""SIM-Mamba shapes, variants, config round trip and the summary."""

from __future__ import annotations

import pytest
import torch

from model.network import NetConfig, SimMamba, build_network, count_parameters
from model.summary import describe

SMALL = dict(widths=(4, 8, 8, 8), d_state=4)


@pytest.mark.parametrize("kw", [
    dict(slices=5), dict(slices=1), dict(slices=3, use_sim=False), dict(slices=3, shared_encoders=True),
    dict(slices=3, directions=2),
])
def test_output_shape_and_gradients(kw):
    net = build_network(NetConfig(**SMALL, **kw))
    x = torch.randn(2, 2, kw["slices"], 32, 48, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 1, 32, 48)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_centre_slice_is_predicted_and_context_matters():
    torch.manual_seed(0)
    net = build_network(NetConfig(slices=3, **SMALL)).eval()
    x = torch.randn(1, 2, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 0] += 1.0  # change a neighbour slice only
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x2))


def test_rejects_wrong_input():
    net = SimMamba(NetConfig(slices=3, **SMALL))
    with pytest.raises(ValueError):
        net(torch.zeros(1, 2, 5, 32, 32))
    with pytest.raises(ValueError):
        net(torch.zeros(1, 2, 3, 30, 32))


def test_config_round_trip_and_summary():
    cfg = NetConfig(slices=3, widths=(8, 16, 32, 64), use_sim=False)
    assert NetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        NetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    text = describe(cfg, 32, 32)
    assert f"{count_parameters(build_network(cfg)):,}" in text and "GFLOP" in text


def test_default_model_is_small():
    """The default must stay CPU-friendly (see docs/model_card.md)."""
    assert count_parameters(build_network(NetConfig())) < 1_000_000


def test_summary_describes_the_shipped_checkpoints_architecture(capsys):
    from model.checkpoint import read_metadata, shipped_checkpoint_path
    from model.summary import main

    main(["--checkpoint", "shipped", "--height", "32", "--width", "32"])
    shipped = NetConfig.from_dict(read_metadata(shipped_checkpoint_path())["architecture"])
    out = capsys.readouterr().out
    assert f"{count_parameters(build_network(shipped)):,}" in out
    assert count_parameters(build_network(shipped)) < 1_000_000  # still CPU-friendly (docs/model_card.md)
