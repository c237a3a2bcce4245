"""The quantizers of the VQ-VAE (`stage1_vqvae.model`): the paper's vector quantizer and the options beside it.

`VectorQuantizer` is the paper's: k = argmin_j ||z_e - e_j||^2, z_q = e_k with the straight-through gradient, the
codebook learned by ||sg[z_e] - e||^2 or by EMA (appendix A.1, gamma = 0.99), beta = commitment_weight on
||z_e - sg[e]||^2; plus k-means init, dead-code restarts and statistics all-reduced across processes (the model
file's header says where its EMA departs from Sonnet's). Its options (a projected or cosine lookup, the rotation
trick, SimVQ's learned map) take plain autograd; the paper's path is fused. `FiniteScalarQuantizer` is FSQ
(Mentzer et al. 2023), without a codebook. `build_quantizer(config)` makes the one a `VQVAEConfig` asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from stage1_vqvae.configuration import VQVAEConfig


def build_quantizer(config: VQVAEConfig) -> nn.Module:
    """The quantizer of a VQVAEConfig: FSQ, or the vector quantizer with the config's own options."""
    if config.quantizer == "fsq":
        return FiniteScalarQuantizer(config.fsq_levels)
    return VectorQuantizer.from_config(config)


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, h, w), straight-through: forward value e_k, gradient to z_e
    codes: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # codebook_loss (loss mode only) + commitment_weight * commitment_loss
    codebook_loss: torch.Tensor  # ||sg[z_e] - e||^2 (mean); reported in EMA mode, not optimised
    commitment_loss: torch.Tensor  # ||z_e - sg[e]||^2 (mean)
    counts: torch.Tensor  # (K,) code histogram of this batch (all ranks when distributed)
    perplexity: torch.Tensor
    usage: torch.Tensor  # fraction of K used in this batch
    dead_codes: torch.Tensor  # codes unused for >= dead_code_window forward passes (0 when restarts are off)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _QuantizeLoss(torch.autograd.Function):
    """The paper's straight-through estimator and its two loss terms, in few passes over (N, D).

    Forward: one subtraction and one dot product (z_q is the looked-up e_k itself); backward: one addcmul
    (plus one multiply for the loss-mode codebook).

    forward(flat z_e, e_k, beta, c) -> (z_q, loss, mse): z_q has the value e_k, mse = mean ||z_e - e_k||^2 and
    loss = c ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2 = (c + beta) mse, with gradients routed as in the paper:
        dL/dz_e = d/dz_q (straight-through) + beta * 2 (z_e - e) / numel
        dL/de   = c * 2 (e - z_e) / numel   (c = 1 for the loss-mode codebook; 0 in EMA mode)
    Autograd of the unfused expression (z_e + sg[e - z_e] and two MSEs) makes about twice the passes; the
    quantizer tests check this routing against that expression.
    """

    @staticmethod
    def forward(ctx, flat, quantized, commitment_weight: float, codebook_weight: float):
        diff = torch.sub(flat, quantized, out=torch.empty_like(quantized))  # (N, D), contiguous even if flat is not
        ctx.save_for_backward(diff)
        ctx.weights = (commitment_weight, codebook_weight)
        d = diff.view(-1)
        mse = torch.dot(d, d) / d.numel()
        ctx.mark_non_differentiable(mse)
        return quantized, (commitment_weight + codebook_weight) * mse, mse

    @staticmethod
    def backward(ctx, grad_zq, grad_loss, _grad_mse):
        (diff,) = ctx.saved_tensors
        commitment_weight, codebook_weight = ctx.weights
        scale = grad_loss * (2.0 / diff.numel())
        if grad_zq is None:
            grad_zq = torch.zeros_like(diff)
        grad_flat = torch.addcmul(grad_zq, diff, scale, value=commitment_weight)
        grad_quantized = None
        if ctx.needs_input_grad[1]:
            grad_quantized = diff * (scale * -codebook_weight)
        return grad_flat, grad_quantized, None, None


def rotation_trick(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): forward value e; the gradient reaches z through sg[lambda R], the
    rotation taking z's direction onto e's and the rescaling of its norm, instead of being copied unchanged.

    R = I - 2 r r^T + 2 e_hat z_hat^T with r = (z_hat + e_hat) / ||z_hat + e_hat||, lambda = ||e|| / ||z||;
    applied to (N, d) rows without forming R: R z = z - 2 r (r . z) + 2 e_hat (z_hat . z).
    """
    z_norm = z.detach().norm(dim=1, keepdim=True).clamp_min(1e-12)
    e_norm = e.detach().norm(dim=1, keepdim=True)
    z_hat, e_hat = z.detach() / z_norm, e.detach() / e_norm.clamp_min(1e-12)
    r = F.normalize(z_hat + e_hat, dim=1)
    rotated = z - 2 * r * (r * z).sum(1, keepdim=True) + 2 * e_hat * (z_hat * z).sum(1, keepdim=True)
    return (e_norm / z_norm) * rotated  # (N, d), equal to e


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on (N, D) -> (k, D) centroids; empty clusters keep their previous centroid."""
    n = x.shape[0]
    if n >= k:
        idx = torch.randperm(n, generator=generator)[:k]
    else:
        idx = torch.randint(n, (k,), generator=generator)
    centroids = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    return centroids


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with the paper's loss, an optional EMA codebook and dead-code restarts.

    Args:
        codebook_size: K, the number of codes.
        codebook_dim: D, the size of each code vector.
        commitment_weight: beta of the commitment term ||z_e - sg[e]||^2.
        decay: EMA decay gamma (paper appendix: 0.99); None learns the codebook by gradient of ||sg[z_e] - e||^2.
        epsilon: Laplace smoothing of the EMA cluster sizes (keeps empty codes from dividing by zero).
        kmeans_init: initialise the codebook by k-means on the first training batch.
        dead_code_window: re-seed codes unused for this many training forward passes (micro-batches) from the
            batch's encoder outputs.
    """

    @classmethod
    def from_config(cls, config: VQVAEConfig) -> VectorQuantizer:
        """The vector quantizer a VQVAEConfig describes (its codebook fields, by name)."""
        names = ("commitment_weight", "decay", "epsilon", "kmeans_init", "kmeans_iters", "dead_code_window")
        names += ("lookup_dim", "l2_normalize", "straight_through", "codebook_transform")
        return cls(config.codebook_size, config.codebook_dim, **{k: getattr(config, k) for k in names})

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        commitment_weight: float = 0.25,
        decay: float | None = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_window: int = 0,
        lookup_dim: int | None = None,
        l2_normalize: bool = False,
        straight_through: str = "ste",
        codebook_transform: str = "none",
    ):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim  # D of the encoder output
        self.lookup_dim = lookup_dim or codebook_dim  # the space the codes live in
        self.projected = lookup_dim is not None  # project_in / project_out exist (also when lookup_dim == D)
        self.l2_normalize = l2_normalize
        self.straight_through = straight_through
        self.codebook_transform = codebook_transform
        # The paper's quantizer takes the fused path below (its gradients derived by hand); any option takes
        # plain autograd.
        self.fused = (
            lookup_dim is None and not l2_normalize and straight_through == "ste" and codebook_transform == "none"
        )
        self.commitment_weight = commitment_weight
        self.decay = decay
        self.epsilon = epsilon
        self.kmeans_iters = kmeans_iters
        self.dead_code_window = dead_code_window
        # Sonnet's init: uniform in +-sqrt(3/K) (unit-variance-ish codes that the encoder can reach).
        bound = math.sqrt(3.0 / codebook_size)
        embed = torch.empty(codebook_size, self.lookup_dim).uniform_(-bound, bound)  # (K, d)
        if lookup_dim is not None:
            self.project_in = nn.Linear(codebook_dim, lookup_dim)  # (N, D) -> (N, d)
            self.project_out = nn.Linear(lookup_dim, codebook_dim)  # (N, d) -> (N, D)
        if codebook_transform == "linear":
            # SimVQ: a frozen random codebook C; the codes are C W^T with W learned (identity at first).
            self.register_buffer("embed", torch.randn(codebook_size, self.lookup_dim) / math.sqrt(self.lookup_dim))
            self.codebook_map = nn.Linear(self.lookup_dim, self.lookup_dim, bias=False)
            nn.init.eye_(self.codebook_map.weight)
        elif decay is None:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        # Host-side copy of `initted` once it is True, so that training steps never read the buffer (a host sync
        # on GPU); loading a state dict may bring initted=False back, so it clears the copy.
        self._initted_seen = not kmeans_init
        self._register_load_state_dict_pre_hook(self._forget_initted)
        # Steps since each code was last chosen: drives dead-code restarts and the dead-code stat.
        self.register_buffer("code_age", torch.zeros(codebook_size, dtype=torch.long))

    # -- the nearest code -------------------------------------------------------------------------

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the closest code in squared L2; ||x||^2 is constant per row and dropped.

        Always fp32, whatever the caller's autocast: under bf16 autocast the addmm below would be downcast and
        choose other codes than the fp32 argmin (~1-6% of them on the demo model).
        """
        with torch.autocast(device_type=flat.device.type, enabled=False):
            if self.fused:
                return self._nearest_fp32(flat.detach().float(), self.embed)
            return self._nearest_fp32(self.to_lookup(flat.float()).detach(), self.codebook())

    def _nearest_fp32(self, flat: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        embed = embed.detach().float()
        e_sq = (embed * embed).sum(1)  # (K,)
        n = flat.shape[0]
        # ||e||^2 - 2 x.e in one addmm per row block. On CPU, blocks of ~1M distances bound the memory
        # (N x K floats would be GBs for large batches and codebooks) at no cost in speed; `min`
        # (values + indices) is faster than `argmin` there. On GPU one block is best.
        block = n if flat.is_cuda else max(1, (1 << 20) // self.codebook_size)
        if block >= n:
            return torch.addmm(e_sq, flat, embed.t(), alpha=-2.0).min(dim=1).indices  # (N,)
        codes = torch.empty(n, dtype=torch.long, device=flat.device)
        for lo in range(0, n, block):
            dist_ = torch.addmm(e_sq, flat[lo : lo + block], embed.t(), alpha=-2.0)  # (block, K)
            codes[lo : lo + block] = dist_.min(dim=1).indices
        return codes

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) code vectors, as the decoder receives them."""
        if self.fused:
            return F.embedding(codes, self.embed).permute(0, 3, 1, 2).contiguous()
        vectors = F.embedding(codes, self.codebook())  # (B, h, w, d)
        if self.projected:
            vectors = self.project_out(vectors)  # (B, h, w, D)
        return vectors.permute(0, 3, 1, 2).contiguous()

    def codebook(self) -> torch.Tensor:
        """(K, d) the codes in the lookup space: SimVQ's C W^T, l2-normalised for a cosine lookup."""
        embed = self.codebook_map(self.embed) if self.codebook_transform == "linear" else self.embed
        return F.normalize(embed, dim=1) if self.l2_normalize else embed

    def to_lookup(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) encoder outputs -> (N, d) in the lookup space (projected down, l2-normalised)."""
        x = self.project_in(flat) if self.projected else flat
        return F.normalize(x, dim=1) if self.l2_normalize else x

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z_e.shape
        if d != self.codebook_dim:
            raise ValueError(f"z_e has {d} channels but codebook_dim is {self.codebook_dim}")
        # Distances, argmin and EMA statistics are unstable in half precision: compute all of it in fp32.
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z_e = z_e.float()
            flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
            x = flat if self.fused else self.to_lookup(flat)  # (N, d): what the codes are compared with
            if self.training and not self._initted_seen:
                if not bool(self.initted):
                    self._kmeans_init(x.detach())
                self._initted_seen = True
            codes = self._nearest_fp32(x.detach(), self.embed if self.fused else self.codebook())  # (N,)
            counts = torch.bincount(codes, minlength=self.codebook_size).float()  # (K,)
            if self.training:
                if _distributed():
                    counts_all = counts.clone()
                    dist.all_reduce(counts_all)
                else:
                    counts_all = counts
                if self.decay is not None:
                    self._ema_update(x.detach(), codes, counts_all)
                self.code_age.add_(1).masked_fill_(counts_all > 0, 0)
                if self.dead_code_window > 0:
                    self._restart_dead_codes(x.detach())
            else:
                counts_all = counts

            # In EMA mode the codebook term has weight 0: the EMA, not a gradient, moves the codes.
            codebook_weight = 1.0 if self.decay is None else 0.0
            if self.fused:
                quantized = F.embedding(codes, self.embed)  # (N, D); carries grad to embed in loss mode
                # Straight-through z_q and both loss terms (values equal; gradients routed as in the paper).
                z_q_flat, loss, mse = _QuantizeLoss.apply(flat, quantized, self.commitment_weight, codebook_weight)
                commitment_loss = codebook_loss = mse
            else:
                e = F.embedding(codes, self.codebook())  # (N, d): grad to embed, or to SimVQ's map
                commitment_loss = F.mse_loss(x, e.detach())  # ||z - sg[e]||^2
                codebook_loss = F.mse_loss(x.detach(), e)  # ||sg[z] - e||^2
                loss = self.commitment_weight * commitment_loss + codebook_weight * codebook_loss
                z_q_flat = rotation_trick(x, e) if self.straight_through == "rotation" else x + (e - x).detach()
                if self.projected:
                    z_q_flat = self.project_out(z_q_flat)  # (N, D)
            z_q = z_q_flat.view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)

            probs = counts_all / counts_all.sum().clamp_min(1)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
            usage = (counts_all > 0).float().mean()
            if self.dead_code_window > 0:
                dead = (self.code_age >= self.dead_code_window).sum()
            else:
                dead = torch.zeros((), dtype=torch.long, device=z_e.device)
        return QuantizerOutput(
            z_q=z_q,
            codes=codes.view(b, h, w),
            loss=loss,
            codebook_loss=codebook_loss.detach(),
            commitment_loss=commitment_loss.detach(),
            counts=counts_all,
            perplexity=perplexity,
            usage=usage,
            dead_codes=dead,
        )

    # -- codebook maintenance -------------------------------------------------------------------------

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """N_i <- g N_i + (1-g) n_i ;  m_i <- g m_i + (1-g) sum z_e ;  e_i = m_i / N~_i (Laplace-smoothed N_i)."""
        embed_sum = torch.zeros_like(self.embed_avg).index_add_(0, codes, flat)  # (K, D)
        if _distributed():
            dist.all_reduce(embed_sum)  # counts arrive already reduced
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_avg.lerp_(embed_sum, 1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))

    def _forget_initted(self, *args, **kwargs) -> None:
        self._initted_seen = False

    @torch.no_grad()
    def _set_codes(self, which: torch.Tensor, vectors: torch.Tensor) -> None:
        self.embed.data[which] = vectors
        if self.decay is not None:
            self.cluster_size[which] = 1.0
            self.embed_avg[which] = vectors

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        if _distributed():
            # Cluster every rank's batch (rank 0 alone may hold fewer vectors than K), in rank order.
            parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, flat.contiguous())
            flat = torch.cat(parts)  # (world * N, D); every rank's batch has the same size
        centroids = kmeans(flat, self.codebook_size, self.kmeans_iters)
        if _distributed():
            dist.broadcast(centroids, src=0)
        self._set_codes(torch.arange(self.codebook_size, device=flat.device), centroids)
        if self.decay is not None:
            self.cluster_size.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.code_age >= self.dead_code_window  # (K,), identical on every rank (reduced counts)
        # Re-seed dead codes from this batch's encoder outputs. Without a host sync (`if dead.any()` would stall
        # a GPU every step): draw a candidate for every code and keep it where the code is dead. Rank 0 draws
        # and broadcasts, so all ranks agree.
        candidates = flat[torch.randint(flat.shape[0], (self.codebook_size,), device=flat.device)]  # (K, D)
        if _distributed():
            dist.broadcast(candidates, src=0)
        self.embed.data.copy_(torch.where(dead[:, None], candidates, self.embed))
        if self.decay is not None:
            self.cluster_size.masked_fill_(dead, 1.0)
            self.embed_avg.copy_(torch.where(dead[:, None], candidates, self.embed_avg))
        self.code_age.masked_fill_(dead, 0)


class FiniteScalarQuantizer(nn.Module):
    """FSQ (Mentzer et al. 2023): each of D = len(levels) dimensions is bounded and rounded to one of L_i values.

    No codebook, so nothing to collapse: the code of a vector is its digits in the mixed-radix system of the
    levels, K = prod(L_i). Rounding passes the gradient straight through. Values are scaled to [-1, 1].
    """

    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)  # (D,) place value of each digit
        self.codebook_size, self.codebook_dim, self.eps = math.prod(levels), len(levels), eps

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) -> values in (-L/2, L/2) that round to exactly L integers per dimension."""
        levels = self.levels.to(z.dtype)
        half_l = (levels - 1) * (1 - self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        # The shift puts z = 0 on a level. Two levels cannot hold 0 inside the range (offset / half_l > 1,
        # atanh would be NaN): there z = 0 sits on the boundary between them, a symmetric sign split.
        ratio = offset / half_l  # 0 (odd L), 1/3 or less (even L >= 4), ~1.001 (L = 2)
        # where() evaluates both branches: the clamp keeps the unused one finite (no ratio lies in (0.999, 1)).
        shift = torch.where(ratio < 1, torch.atanh(ratio.clamp_max(0.999)), torch.zeros_like(ratio))
        return torch.tanh(z + shift) * half_l - offset

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) codes: the rounded digits as one mixed-radix number."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            return self.codes_of(torch.round(self._bound(flat.detach().float())) / (self.levels // 2))

    def codes_of(self, values: torch.Tensor) -> torch.Tensor:
        """(N, D) quantized values in [-1, 1] -> (N,) codes (the inverse of `lookup`)."""
        half = self.levels // 2
        digits = torch.round(values * half).long() + half  # (N, D) in [0, L)
        return (digits * self.basis).sum(-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) values in [-1, 1]."""
        digits = (codes.long()[..., None] // self.basis) % self.levels  # (B, h, w, D)
        values = (digits - self.levels // 2).float() / (self.levels // 2).float()
        return values.permute(0, 3, 1, 2).contiguous()

    def codebook(self) -> torch.Tensor:
        """(K, D) every code's values (implicit: nothing is learned)."""
        return self.lookup(torch.arange(self.codebook_size, device=self.levels.device)[None, None])[0, :, 0].t()

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z_e.shape
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
            bounded = self._bound(flat)
            rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight through the rounding
            z_q = (rounded / (self.levels // 2).float()).view(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
            codes = self.nearest(flat)
            counts = torch.bincount(codes, minlength=self.codebook_size).float()
            if self.training and _distributed():
                dist.all_reduce(counts)
            probs = counts / counts.sum().clamp_min(1)
            zero = torch.zeros((), device=z_e.device)
        return QuantizerOutput(
            z_q=z_q,
            codes=codes.view(b, h, w),
            loss=zero,  # no codebook and no commitment term
            codebook_loss=zero,
            commitment_loss=zero,
            counts=counts,
            perplexity=torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum()),
            usage=(counts > 0).float().mean(),
            dead_codes=torch.zeros((), dtype=torch.long, device=z_e.device),
        )
