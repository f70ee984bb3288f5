"""``python -m clipfast.sce IMAGES.npy TEXTS.npy``: SCE and text-part scores of paired embeddings.

Loads two (n, d) arrays (row i of TEXTS is the prompt of image i), prints the Schur Complement Entropy
of the images and the score of the text part (:func:`clipfast.sce_score`), the unexplained share
``tr(S) / tr(C_xx)`` and the Renyi/Vendi family of both matrices, and with ``--plot`` writes a PNG of the
two spectra (eigenvalues of S and P, descending, log scale).

    python -m clipfast.sce images.npy texts.npy --kernel gaussian --sigma 3.5 --rff-dim 2500 \\
        --convention clip-dissection --plot spectra.png
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from clipfast import schur_covariance as schur


DESCRIPTION = """SCE and text-part scores of paired embeddings.

Loads two (n, d) .npy arrays (row i of TEXTS is the prompt of image i) and prints the Schur Complement
Entropy of the images, the score of the text part, the unexplained share tr(S) / tr(C_xx) and the
Renyi/Vendi family of both matrices; --plot writes the two spectra to a PNG."""

EPILOG = """example (the published numbers; F = 5000: about 20-40 s on 2 idle cores, minutes on a busy one):
  python -m clipfast.sce images.npy texts.npy --kernel gaussian --sigma 3.5 --rff-dim 2500
      --convention clip-dissection --plot spectra.png"""


def _load(path: str, dtype: Optional[str], parser: argparse.ArgumentParser) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:  # missing, unreadable, or not a .npy array
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        parser.exit(2, f"{parser.prog}: error: cannot read {path}: {reason}\n")
    if array.ndim != 2:
        parser.exit(2, f"{parser.prog}: error: {path}: expected an (n, d) array, got shape {array.shape}\n")
    if not np.issubdtype(array.dtype, np.floating):
        parser.exit(2, f"{parser.prog}: error: {path}: expected floating-point embeddings, got {array.dtype}\n")
    if dtype is not None:
        array = array.astype(dtype)
    elif array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))


def _order_name(order: float) -> str:
    return "inf" if order == math.inf else f"{order:g}"


def _plot(path: str, complement: torch.Tensor, text_part: torch.Tensor, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; the figure only goes to a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, matrix in (("Schur complement S (images | text)", complement), ("text part P", text_part)):
        eigenvalues = torch.linalg.eigvalsh(matrix.double()).flip(0).numpy()
        positive = eigenvalues[eigenvalues > 0]  # log scale: rounding-level negatives are not drawn
        ax.plot(np.arange(1, positive.size + 1), positive, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipfast.sce", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="(n, d) .npy image embeddings")
    parser.add_argument("texts", help="(n, d) .npy text embeddings, row i = prompt of image i")
    parser.add_argument("--kernel", choices=schur.KERNELS, default="cosine", help="kernel (default: cosine)")
    parser.add_argument("--sigma", type=float, help="Gaussian bandwidth, needed with --kernel gaussian "
                                                    "(published demo: 3.5; no default)")
    parser.add_argument("--rff-dim", type=int, help="random frequencies m, F = 2m, needed with --kernel gaussian "
                                                    "(published demo: 2500; no default)")
    parser.add_argument("--convention", choices=schur.CONVENTIONS, default="normalized",
                        help="normalized (default) or clip-dissection (the published procedure)")
    parser.add_argument("--ridge", type=float, help="ridge (default: 1e-3 relative for normalized, "
                                                    "1e-12 absolute for clip-dissection)")
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        help="input dtype (default: the file's; float16 files are read as float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random frequencies (default: 0)")
    parser.add_argument("--plot", metavar="PATH.png", help="write the two spectra to this PNG (default: no plot)")
    args = parser.parse_args(argv)

    images, texts = _load(args.images, args.dtype, parser), _load(args.texts, args.dtype, parser)
    options = dict(kernel=args.kernel, convention=args.convention, ridge=args.ridge)
    if args.kernel == "gaussian":
        options.update(sigma=args.sigma, rff_dim=args.rff_dim, generator=torch.Generator().manual_seed(args.seed))
    try:
        with torch.no_grad():
            split = schur.schur_complement(images, texts, **options)
    except (TypeError, ValueError) as error:
        parser.error(str(error))

    def score(matrix):
        return schur.matrix_score(matrix, args.convention, 1.0).item()

    n, d = images.shape
    print(f"pairs n = {n}, d = {d}, kernel = {args.kernel}, convention = {args.convention}, "
          f"features F = {split.complement.shape[0]}, ridge = {split.ridge:g}, dtype = {images.dtype}")
    print(f"SCE (images beyond their prompts) = {score(split.complement):.6g}")
    print(f"text part score                   = {score(split.text_part):.6g}")
    unexplained = (torch.trace(split.complement) / torch.trace(split.image_cov)).item()
    print(f"unexplained share tr(S)/tr(C_xx)  = {unexplained:.6g}")
    print("Renyi/Vendi family of the trace-normalised spectra:")
    print("  order " + "".join(f"{_order_name(q):>12}" for q in schur.ORDERS))
    for name, matrix in (("S", split.complement), ("P", split.text_part)):
        family = schur.renyi_scores(matrix)
        print(f"  {name:<5} " + "".join(f"{family[q].item():>12.6g}" for q in schur.ORDERS))
    if args.plot:
        _plot(args.plot, split.complement, split.text_part,
              f"{args.kernel} kernel, {args.convention}, n = {n}")
        print(f"spectra written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
