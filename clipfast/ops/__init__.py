"""The registration point: every clipfast op as a torch.library custom op (fake, autograd, kernels)."""

from clipfast.ops import contrastive  # noqa: F401  (registers clipfast::contrastive_loss and friends)
from clipfast.ops import schur_covariance  # noqa: F401  (registers clipfast::schur_covariance_gram)
from clipfast.ops import token_keep  # noqa: F401  (registers clipfast::token_keep_*)
from clipfast.ops import token_medoids  # noqa: F401  (registers clipfast::token_medoids_index)
from clipfast.ops import token_merge  # noqa: F401  (registers clipfast::token_merge_*)
