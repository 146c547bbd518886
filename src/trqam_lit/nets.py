"""Networks: the MLP trunk, the velocity field v(s, x, t) and the batched critic ensemble Q_j(s, a).

All follow spec method.md section 5: hidden layers Dense -> GELU (tanh approximation) -> optional LayerNorm
(eps 1e-6), Xavier-uniform weights, zero biases, a linear output layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-6


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (flax's ``nn.gelu`` default, used by the reference)."""
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Plain MLP: ``len(hidden_dims)`` hidden layers, each Linear -> GELU(tanh) -> [LayerNorm], then Linear."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, layer_norm: bool = False) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=LAYER_NORM_EPS) for d in hidden_dims) if layer_norm else None
        self.out = nn.Linear(dims[-1], out_dim)
        for lin in [*self.hidden, self.out]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        for i, lin in enumerate(self.hidden):
            x = gelu_tanh(lin(x))
            if self.norms is not None:
                x = self.norms[i](x)
        return self.out(x)


class VelocityField(nn.Module):
    """Flow-policy velocity field v(s, x, t) on the flattened action chunk x (dimension ``action_dim``).

    The input is concat(s, x, t) with t a raw scalar per row, as in the reference. ``s`` may carry fewer
    leading dimensions than ``x`` (e.g. the K flow steps stacked in front): it is broadcast.
    """

    def __init__(
        self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (512,) * 4, layer_norm: bool = False
    ) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.mlp = MLP(obs_dim + action_dim + 1, hidden_dims, action_dim, layer_norm)

    def forward(self, s: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
        lead = x.shape[:-1]
        t = x.new_full((*lead, 1), float(t)) if not torch.is_tensor(t) else t.to(x.dtype).expand(*lead, 1)
        s = s.to(x.dtype).expand(*lead, s.shape[-1])
        return self.mlp(torch.cat([s, x, t], dim=-1))


class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matmul; weight layout (E, in, out)."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_members, out_dim))
        bound = math.sqrt(6.0 / (in_dim + out_dim))  # Xavier-uniform per member
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, in) shared by all members, or (E, B, in) per member.
        if x.dim() == 2:
            return torch.einsum("bi,eio->ebo", x, self.weight) + self.bias[:, None, :]
        return torch.baddbmm(self.bias[:, None, :], x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """Per-member LayerNorm (eps 1e-6) with its own scale and bias, shape (E, d)."""

    def __init__(self, num_members: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_members, dim))
        self.bias = nn.Parameter(torch.zeros(num_members, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
        return x * self.weight[:, None, :] + self.bias[:, None, :]


class CriticEnsemble(nn.Module):
    """E critics Q_j(s, a) on concat(s, a), computed as one batched operation; returns (E, B)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        num_members: int = 10,
        hidden_dims: Sequence[int] = (512,) * 4,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        self.num_members = num_members
        dims = [obs_dim + action_dim, *hidden_dims]
        self.hidden = nn.ModuleList(EnsembleLinear(num_members, a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.norms = nn.ModuleList(EnsembleLayerNorm(num_members, d) for d in hidden_dims) if layer_norm else None
        self.out = EnsembleLinear(num_members, dims[-1], 1)

    def forward(self, s: Tensor, a: Tensor) -> Tensor:
        x = torch.cat([s.to(a.dtype), a], dim=-1)
        for i, lin in enumerate(self.hidden):
            x = gelu_tanh(lin(x))
            if self.norms is not None:
                x = self.norms[i](x)
        return self.out(x).squeeze(-1)
