"""Streaming Schur Complement Entropy: :func:`clipfast.sce_score` over more pairs than fit in memory."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from clipfast import schur_covariance as schur
from clipfast.dtypes import compute_dtype
from clipfast.ops.schur_covariance import covariance_from_gram, schur_covariance_gram


class SchurComplementEntropy(nn.Module):
    """Metric-style SCE: ``update(images, texts)`` batch by batch, then ``compute()``.

    Every covariance block is a sum over pairs, so the state is the unnormalised feature Gram sums

        G_tt = sum_i phi(t_i) phi(t_i)^T,  G_tx = sum_i phi(t_i) phi(x_i)^T,  G_xx = sum_i phi(x_i) phi(x_i)^T

    (``(F, F)`` each, float64 so that millions of pairs add up without float32 drift) and the pair count
    n; memory is O(F^2) whatever n is. For the normalised cosine and the Gaussian kernel ``phi`` is the
    row map and ``C = G / n``. The published column cosine (``convention="clip-dissection"``) normalises
    columns over ALL n samples, which no batch knows: the state is then the raw Gram of the embeddings
    (``phi(z) = z``), whose diagonal is the column sums of squares, and ``compute()`` applies
    ``C_ab = D_a^{-1} G_ab D_b^{-1} / d`` (``D`` = column norms clamped at 1e-8) once. One pass, exact:
    ``compute()`` equals :func:`clipfast.sce_score` on the concatenated batches up to summation order.

    Args (as :func:`clipfast.schur_complement`): kernel, convention, sigma, rff_dim, omegas, generator,
    ridge; order: Renyi order of the "normalized" scores. With ``kernel="gaussian"`` and no ``omegas``,
    the frequencies are drawn at the first ``update`` (d is known then) and kept across ``reset()``.

    ``update`` runs without autograd: use :func:`clipfast.sce_score` for a differentiable score.
    ``compute()`` syncs with the host once (the pair count).
    """

    def __init__(self, kernel: str = "cosine", convention: str = "normalized", sigma: Optional[float] = None,
                 rff_dim: Optional[int] = None, omegas: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, ridge: Optional[float] = None, order: float = 1):
        super().__init__()
        schur.check_kernel_options(kernel, convention, sigma, rff_dim, omegas, generator)
        self.kernel = kernel
        self.convention = convention
        self.ridge = schur.resolve_ridge(ridge, convention)
        self.order = schur.resolve_order(order, convention)
        self.sigma = sigma
        self.rff_dim = rff_dim
        self.generator = generator
        self.covariance = schur.covariance_kind(kernel, convention)
        self.register_buffer("omegas", None if omegas is None else omegas.detach().clone())
        self.register_buffer("text_gram", None)
        self.register_buffer("cross_gram", None)
        self.register_buffer("image_gram", None)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self._input_dtype: Optional[torch.dtype] = None
        self._dim: Optional[int] = None

    def reset(self) -> None:
        """Forget every pair (the Gaussian frequencies stay, so later scores stay comparable)."""
        self.text_gram = self.cross_gram = self.image_gram = None
        self.count = torch.zeros((), dtype=torch.int64, device=self.count.device)
        self._input_dtype = None
        self._dim = None

    @torch.no_grad()
    def update(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        """Add a batch of pairs: images (b, d) and texts (b, d), same dtype and device, b >= 1."""
        schur.check_pairs(images, texts, "images", "texts", min_rows=1)
        if self._dim is None:
            self._dim, self._input_dtype = images.shape[1], images.dtype
        elif images.shape[1] != self._dim or images.dtype != self._input_dtype:
            raise ValueError(f"every batch must be (b, {self._dim}) {self._input_dtype}, got "
                             f"{tuple(images.shape)} {images.dtype}")
        omegas = None
        if self.kernel == "gaussian":
            if self.omegas is None:
                self.omegas = schur.rff_omegas(self._dim, int(self.rff_dim), self.sigma, generator=self.generator,
                                               device=images.device)
            omegas = schur.prepare_omegas(self.omegas, images)
        grams = schur_covariance_gram(images, texts, self.covariance, omegas)
        grams = [g.to(torch.float64) for g in grams]
        if self.text_gram is None:
            self.text_gram, self.cross_gram, self.image_gram = grams
            self.count = self.count.to(images.device)
        else:
            self.text_gram += grams[0]
            self.cross_gram += grams[1]
            self.image_gram += grams[2]
        self.count += images.shape[0]

    def compute(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sce, text_part_score)`` of all pairs seen, as :func:`clipfast.sce_score` with this module's
        arguments: 0-d, float32 (float64 for float64 inputs)."""
        n = int(self.count)
        if n < 2:
            raise ValueError(f"SchurComplementEntropy needs at least 2 pairs, has seen {n}")
        blocks = covariance_from_gram(self.text_gram, self.cross_gram, self.image_gram, self.covariance, n)
        # The split's dtype follows sce_score's rule (float64 for "normalized" when F >= n: schur.work_dtype).
        dtype = schur.work_dtype(self._input_dtype, self.convention, blocks[0].shape[0], n)
        out = compute_dtype(self._input_dtype)
        text_part, complement = schur.schur_split(*(b.to(dtype) for b in blocks), self.convention, self.ridge)
        return (schur.matrix_score(complement, self.convention, self.order).to(out),
                schur.matrix_score(text_part, self.convention, self.order).to(out))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}, convention={self.convention!r}, ridge={self.ridge}, order={self.order}"
