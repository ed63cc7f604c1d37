"""How the custom ops meet autograd and the ``torch.func`` transforms.

Each differentiable op (``local_softmax``, ``ideal_softmax``, ``aligned_softmax``) has a
``torch.autograd.Function`` written in the form the ``torch.func`` transforms take (a ``forward`` without
``ctx``, a ``setup_context``, a ``backward``, a ``jvp`` and a ``vmap`` staticmethod), and :func:`route` makes it
the op's entry for autograd and for ``torch.func``:

- the op's ``Autograd`` kernel applies the Function, so that ``backward`` (reverse mode) and ``jvp`` (forward
  mode: ``torch.autograd.forward_ad``) are the Function's. ``torch.library``'s own ``register_autograd`` cannot
  serve here: the Function it generates has no ``setup_context`` (``torch.func.grad`` then fails inside torch)
  and no forward-mode formula (a dual tensor's tangent is dropped without a word);
- a kernel at functorch's front key (``FuncTorchDynamicLayerFrontMode``, active while a ``torch.func`` transform
  runs) applies the same Function before functorch unwraps the op's arguments, so that ``grad``, ``vjp``,
  ``jacrev``, ``jvp``, ``jacfwd``, ``hessian`` and ``vmap`` meet its rules (an op reached through functorch's
  ordinary route would meet torch's generated Function again).

The Function's ``forward`` calls the op once more; the op's Autograd kernel sees that it runs inside a
``forward`` (a thread-local count) and dispatches below autograd to the engines, as ``torch.library`` does
(``torch._C._AutoDispatchBelowAutograd``, ``torch._C._after_autograd_keyset``: the same two internals its
``custom_op`` uses). Under ``torch.compile`` the op stays one opaque node of the graph; AOTAutograd traces the
Function's ``forward`` and ``backward`` through the same Autograd kernel.

The ops that compute derivatives (``*_backward``, ``*_jvp``) are routed too, with Functions whose own
derivatives raise (:data:`SECOND_DERIVATIVES`): a second derivative is refused with that message, in reverse and
forward mode and through ``torch.func`` (``hessian``), never returned as zero. Their ``vmap`` rules batch as
the forward ops' do (``jacrev`` is a ``vmap`` of the backward op, ``jacfwd`` one of the jvp op).

``vmap``: the ops are batched over their queries already, so a vmapped dimension of the per-query arguments
(query, times, coefficients, labels, gradients, tangents) is folded into the query batch, one call
(:func:`fold`); a vmapped training set, key-set table or mask is computed one slice at a time.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Sequence

import torch

SECOND_DERIVATIVES = ("second derivatives of patchmosaic's machines are not implemented (the derivative passes "
                      "of its ops, *_backward and *_jvp, are not themselves differentiable): first derivatives "
                      "only, in reverse mode (backward, torch.func.grad / vjp / jacrev) or forward mode "
                      "(torch.func.jvp / jacfwd, torch.autograd.forward_ad)")

_LIB = torch.library.Library("patchmosaic", "FRAGMENT")
_STATE = threading.local()


class _Inside:
    """Marks the current thread as running a routed Function's ``forward`` (the op it calls then goes to the
    engines, not back to the Function)."""

    def __enter__(self):
        _STATE.depth = getattr(_STATE, "depth", 0) + 1

    def __exit__(self, *exc):
        _STATE.depth -= 1


def inside_forward() -> _Inside:
    return _Inside()


def _full(args: tuple, n: int) -> tuple:
    """The dispatcher drops trailing arguments equal to their defaults (every default of these ops is None):
    the ``n`` arguments of the schema."""
    return tuple(args) + (None,) * (n - len(args))


def route(name: str, function: type) -> None:
    """Make ``function`` (a ``torch.autograd.Function`` whose ``forward`` calls ``torch.ops.patchmosaic.<name>``
    inside :func:`inside_forward`) the entry of the op ``name`` for autograd and for ``torch.func``."""
    op = getattr(torch.ops.patchmosaic, name).default
    (schema,) = torch._C._jit_get_schemas_for_operator(f"patchmosaic::{name}")
    n = len(schema.arguments)

    def autograd_kernel(keyset, *args):
        if getattr(_STATE, "depth", 0):
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        return function.apply(*_full(args, n))

    def functorch_kernel(keyset, *args):
        return function.apply(*_full(args, n))

    with warnings.catch_warnings():  # the kernel replaces custom_op's generated one (a warning says so)
        warnings.simplefilter("ignore")
        _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    _LIB.impl(name, functorch_kernel, "FuncTorchDynamicLayerFrontMode", with_keyset=True)


def call(name: str, *args):
    """``torch.ops.patchmosaic.<name>(*args)`` from a routed Function's ``forward``."""
    with inside_forward():
        return getattr(torch.ops.patchmosaic, name).default(*args)


# ------------------------------------------------------------------------------------------------- vmap
def fold(info, in_dims: Sequence, args: Sequence, per_query: Sequence[int], apply: Callable):
    """The ``vmap`` rule of an op batched over its queries: ``(outputs, out_dims)``.

    ``per_query``: the positions of the arguments whose first dimension is the query batch ``B`` (or None). When
    only those are vmapped, the vmapped dimension ``V`` is folded into the batch (``V * B`` queries, one call of
    ``apply``; an unbatched one is repeated) and every output whose first dimension is ``V * B`` is unfolded to
    ``(V, B, ...)``; the other outputs (empty provenance) are not batched. Otherwise (a vmapped training set,
    table or mask) ``apply`` runs once per slice and the outputs are stacked."""
    V = info.batch_size
    if any(d is not None for i, d in enumerate(in_dims) if i not in per_query):
        outs = [apply(*[a if d is None else a.select(d, v) for a, d in zip(args, in_dims)]) for v in range(V)]
        if isinstance(outs[0], torch.Tensor):
            return torch.stack(outs), 0
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    B = None
    for i in per_query:
        if args[i] is not None:
            B = args[i].shape[0] if in_dims[i] is None else args[i].movedim(in_dims[i], 0).shape[1]
            break
    new = list(args)
    for i in per_query:
        a, d = args[i], in_dims[i]
        if a is None:
            continue
        if d is None:
            new[i] = a.unsqueeze(0).expand(V, *a.shape).reshape(V * a.shape[0], *a.shape[1:])
        else:
            a = a.movedim(d, 0)
            new[i] = a.reshape(V * a.shape[1], *a.shape[2:])
    out = apply(*new)

    def unfold(o):
        if o.dim() >= 1 and o.shape[0] == V * B:
            return o.reshape(V, B, *o.shape[1:]), 0
        return o, None

    if isinstance(out, torch.Tensor):
        return unfold(out)
    pairs = [unfold(o) for o in out]
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


class FirstDerivative(torch.autograd.Function):
    """Base of the routed Functions of the derivative ops (``*_backward``, ``*_jvp``): ``name`` the op,
    ``per_query`` its per-query argument positions (:func:`fold`). Their own derivatives raise
    :data:`SECOND_DERIVATIVES`."""

    name: str = ""
    per_query: Sequence[int] = ()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(SECOND_DERIVATIVES)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(SECOND_DERIVATIVES)


def derivative_function(name: str, per_query: Sequence[int]) -> type:
    """A routed Function for the derivative op ``name`` (see :class:`FirstDerivative`), routed."""

    def forward(*args):
        return call(name, *args)

    def vmap(info, in_dims, *args):
        return fold(info, in_dims, args, per_query, fn.apply)

    fn = type(f"{name}_function", (FirstDerivative,), {"name": name, "per_query": tuple(per_query),
                                                        "forward": staticmethod(forward),
                                                        "vmap": staticmethod(vmap)})
    route(name, fn)
    return fn
