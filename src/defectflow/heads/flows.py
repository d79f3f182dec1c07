"""Conditional normalizing flows over feature vectors (CFlow-AD's decoders), built with FrEIA.

Each feature level gets its own flow. A feature vector x at grid position (i, j) is mapped to a
latent z under a standard normal, conditioned on a 2-D sinusoidal encoding of (i, j); its
log-likelihood per dimension is the score the anomaly map is made of.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """dim x height x width sinusoidal encoding: first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"Positional encoding size must be a multiple of 4, got {dim}")
    half = dim // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(10000.0) / half))
    columns = torch.arange(width, dtype=torch.float32)[:, None] * frequencies  # W x half/2
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies  # H x half/2
    encoding = torch.zeros(dim, height, width)
    encoding[0:half:2] = torch.sin(columns).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1::2] = torch.cos(rows).T[:, :, None].expand(-1, -1, width)
    return encoding


class CouplingSubnet(nn.Sequential):
    """Linear-ReLU-Linear of a coupling block. With `bf16` on, its matrix products (nearly all of
    a flow's arithmetic) run in bfloat16 and its output comes back as float32, so the coupling,
    the permutation and the log-determinant stay float32: training speed without a low-precision
    likelihood. Off (the default, and always at inference) it is the plain float32 network."""

    def __init__(self, dims_in: int, hidden: int, dims_out: int) -> None:
        super().__init__(nn.Linear(dims_in, hidden), nn.ReLU(), nn.Linear(hidden, dims_out))
        self.bf16 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return super().forward(x).float()


@contextmanager
def bf16_subnets(flow: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, the coupling subnetworks of `flow` compute in bfloat16 (see CouplingSubnet)."""
    subnets = [m for m in flow.modules() if isinstance(m, CouplingSubnet)]
    for subnet in subnets:
        subnet.bf16 = enabled
    try:
        yield
    finally:
        for subnet in subnets:
            subnet.bf16 = False


def _subnet(dims_in: int, dims_out: int) -> nn.Module:
    return CouplingSubnet(dims_in, 2 * dims_in, dims_out)


def image_flow(dims: int, n_blocks: int, clamp: float, hidden: int) -> Ff.SequenceINN:
    """Unconditional flow over one vector per image (DifferNet)."""
    flow = Ff.SequenceINN(dims)
    for _ in range(n_blocks):
        flow.append(Fm.AllInOneBlock, subnet_constructor=lambda i, o: CouplingSubnet(i, hidden, o), affine_clamping=clamp,
                    permute_soft=False)
    return flow


def conditional_flow(channels: int, cond_dim: int, n_blocks: int, clamp: float) -> Ff.SequenceINN:
    flow = Ff.SequenceINN(channels)
    for _ in range(n_blocks):
        flow.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(cond_dim,),
            subnet_constructor=_subnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    return flow


def _per_dim(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """log p / C of N x C latents under the standard normal, with the flow's log-determinant."""
    channels = z.shape[1]
    return (-0.5 * (z.pow(2).sum(dim=1) + channels * _LOG_2PI) + log_jac_det) / channels


def log_likelihood_per_dim(flow: Ff.SequenceINN, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """log p(x | cond) / C for N x C vectors under the flow (standard normal base)."""
    return _per_dim(*flow(x, c=[cond]))


def grid_log_likelihood(flow: Ff.SequenceINN, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """log_likelihood_per_dim for B x P x C vectors at P grid positions whose conditions (P x
    cond_dim) all B images share, as B x P. Each coupling subnet's first layer is split into its
    vector and condition parts, and the condition part is computed once per position instead of
    once per vector: at 256 x 256 that is half of the flows' arithmetic (an exported graph folds
    it into a constant). Equal to the FrEIA forward up to float rounding (conditional_flow's
    blocks: no reverse pre-permutation, no Householder, one condition)."""
    batch, positions, channels = x.shape
    x = x.reshape(batch * positions, channels)
    log_jac_det = torch.zeros(batch * positions, dtype=x.dtype, device=x.device)
    for block in flow.module_list:
        first, activation, second = block.subnet
        x1, x2 = torch.split(x, block.splits, dim=1)
        width = x1.shape[1]
        hidden = F.linear(x1, first.weight[:, :width]).view(batch, positions, -1) + F.linear(cond, first.weight[:, width:], first.bias)
        x2, coupling_jac = block._affine(x2, second(activation(hidden)).view(batch * positions, -1))
        x, scaling_jac = block._permute(torch.cat((x1, x2), 1))
        log_jac_det = log_jac_det + coupling_jac + scaling_jac
    return _per_dim(x, log_jac_det).view(batch, positions)


class ConditionalFlows(nn.Module):
    """One conditional flow per feature level; maps feature maps to per-level log-likelihood maps.

    With a neighbourhood k > 1 a flow models the mean of each cell's k x k neighbourhood on its
    level's grid (PatchCore's local aggregation), not the cell alone: one cell's feature varies
    with where the part's texture happens to fall on the grid, its neighbourhood's mean much less,
    so good parts score more alike while a defect, which changes its whole neighbourhood, does not
    average away. Training and scoring both see the means (neighbourhood_mean)."""

    def __init__(self, channels: Sequence[int], cond_dim: int = 128, n_blocks: int = 8, clamp: float = 1.9,
                 neighbourhood: int = 1) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        self.neighbourhood = neighbourhood
        self.flows = nn.ModuleList(conditional_flow(c, cond_dim, n_blocks, clamp) for c in channels)

    def neighbourhood_mean(self, features: torch.Tensor) -> torch.Tensor:
        """B x C x h x w features -> each cell's mean over its neighbourhood (the cells inside the
        grid only, so the border is not pulled towards 0); the features themselves for k = 1."""
        k = self.neighbourhood
        return features if k == 1 else F.avg_pool2d(features, k, stride=1, padding=k // 2, count_include_pad=False)

    def condition(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(H*W) x cond_dim positional conditions in row-major order of the grid."""
        return positional_encoding_2d(self.cond_dim, height, width).to(device).flatten(1).T

    def vector_log_likelihood(self, level: int, vectors: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """N x C feature vectors with N x cond_dim conditions -> N log-likelihoods per dimension."""
        return log_likelihood_per_dim(self.flows[level], vectors, cond)

    def level_log_likelihood(self, level: int, features: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """B x C x h x w features -> B x h x w log-likelihood per dimension, in chunks of whole
        images (about `chunk` vectors) to bound memory. An exported graph is not chunked: a loop
        over the batch would fix its batch size."""
        batch, channels, height, width = features.shape
        vectors = self.neighbourhood_mean(features).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        cond = self.condition(height, width, features.device)
        if torch.compiler.is_exporting():
            return grid_log_likelihood(self.flows[level], vectors, cond).view(batch, height, width)
        step = max(1, chunk // (height * width))
        out = torch.cat([grid_log_likelihood(self.flows[level], vectors[i:i + step], cond) for i in range(0, batch, step)])
        return out.view(batch, height, width)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.level_log_likelihood(level, f) for level, f in enumerate(features)]
