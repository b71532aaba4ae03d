"""Ensembles: several SIM-Mamba networks whose probabilities are averaged.

An ensemble answers the same calls as one network (``forward`` and
``forward_planes``) and returns the logit of its members' mean probability, so
the Predictor, validation and post-processing need no special case. Checkpoints
of ensembles are written by :func:`model.checkpoint.save_ensemble`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from model.network import SimMamba


class Ensemble(nn.Module):
    """Average of the members' probabilities, returned as a logit.

    Parameters
    ----------
    members:
        Two or more networks with the same number of slices K.

    Attributes
    ----------
    cfg:
        The first member's config (the input contract: K).
    """

    def __init__(self, members: Sequence[SimMamba]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        slices = {m.cfg.slices for m in members}
        if len(slices) != 1:
            raise ValueError(f"ensemble members must share K, got K = {sorted(slices)}")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    @staticmethod
    def _mean_probability_logit(logits: list[torch.Tensor]) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(x) for x in logits]).mean(0)
        return torch.logit(prob, eps=1e-7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, K, H, W) -> logits (B, 1, H, W) of the mean probability."""
        return self._mean_probability_logit([m(x) for m in self.members])

    def forward_planes(self, planes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """As :meth:`SimMamba.forward_planes`, averaged over the members."""
        return self._mean_probability_logit([m.forward_planes(planes, index) for m in self.members])
