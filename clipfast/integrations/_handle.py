"""``PatchHandle``: the reversible record of one clipfast patch on one model instance.

Every integration (``patch_hf_clip``, ...) patches by setting plain *instance* attributes (a bound
``forward``, a wrapper object) through a handle, never by assigning to a class or a module. The
handle remembers, for each attribute it sets, the value the instance held before or that it held
none, so ``unpatch()`` restores the instance exactly: attributes that were absent are deleted again,
which lets the class attribute (e.g. ``CLIPModel.forward``) show through as before.

The handle also stores itself on the patched instance under :data:`MARKER_ATTR`, so a second patch
of the same instance fails loudly instead of stacking two patches that would unpatch out of order.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch

#: Instance attribute holding the active :class:`PatchHandle` of a patched object.
MARKER_ATTR = "_clipfast_patch"

_MISSING = object()  # default for lookups only; records say absence with a bool, which deepcopy keeps


class PatchHandle:
    """Records the instance attributes a patch sets and restores them on :meth:`unpatch`.

    Args:
        target: the object being patched (e.g. a ``transformers.CLIPModel`` instance).
        name: who patches it, for messages (e.g. ``"clipfast.integrations.patch_hf_clip"``).

    Raises:
        RuntimeError: ``target`` already carries an active clipfast patch (the message names it).

    Use ``handle.unpatch()`` (idempotent), or the handle as a context manager, which unpatches on exit::

        with clipfast.integrations.patch_hf_clip(model):
            ...
    """

    def __init__(self, target: Any, name: str):
        existing = vars(target).get(MARKER_ATTR)
        if existing is not None:
            raise RuntimeError(
                f"this {type(target).__name__} instance is already patched by {existing!r}; patching it twice "
                f"is not supported. Call .unpatch() on that handle (also reachable as "
                f"`model.{MARKER_ATTR}`) before patching again.")
        self.target = target
        self.name = name
        # (object, attribute, whether it had one, previous value, value set), in the order they were set
        self._records: List[Tuple[Any, str, bool, Any, Any]] = []
        self._active = True
        self.set(target, MARKER_ATTR, self)

    @property
    def active(self) -> bool:
        """True until :meth:`unpatch` has run."""
        return self._active

    @property
    def attributes(self) -> List[str]:
        """Names of the attributes this patch set, in order (the marker included)."""
        return [record[1] for record in self._records]

    def set(self, obj: Any, attr: str, value: Any) -> None:
        """Set the instance attribute ``obj.<attr> = value``, remembering what it replaces.

        Only plain instance attributes are handled: a ``torch.nn.Module``'s registered parameters,
        buffers and submodules live outside ``__dict__`` and would not be restored exactly, so they raise.
        """
        if not self._active:
            raise RuntimeError(f"{self!r} was already unpatched; create a new patch instead")
        if isinstance(obj, torch.nn.Module) and (
                attr in obj._parameters or attr in obj._buffers or attr in obj._modules
                or isinstance(value, (torch.nn.Module, torch.nn.Parameter))):
            raise TypeError(f"PatchHandle sets plain instance attributes only; {type(obj).__name__}.{attr} "
                            "is (or would become) a registered parameter, buffer or submodule")
        previous = vars(obj).get(attr, _MISSING)
        existed = previous is not _MISSING
        self._records.append((obj, attr, existed, previous if existed else None, value))
        setattr(obj, attr, value)

    def unpatch(self) -> None:
        """Restore every attribute this patch set, newest first; a no-op after the first call.

        Raises:
            RuntimeError: one of the attributes was replaced by someone else after this patch; restoring
                it would silently discard their change, so nothing is restored.
        """
        if not self._active:
            return
        # The value this patch set last on each attribute must still be there (identity, not equality).
        latest = {(id(obj), attr): (obj, attr, value) for obj, attr, _, _, value in self._records}
        for obj, attr, value in latest.values():
            if vars(obj).get(attr, _MISSING) is not value:
                raise RuntimeError(
                    f"{type(obj).__name__}.{attr} was replaced after {self!r} set it; restoring the original "
                    "would discard that change. Undo it first, then call unpatch() again.")
        for obj, attr, existed, previous, _ in reversed(self._records):
            if existed:
                setattr(obj, attr, previous)
            else:
                delattr(obj, attr)
        self._records.clear()
        self._active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self._active else "unpatched"
        return f"<PatchHandle {self.name} on {type(self.target).__name__} ({state})>"
