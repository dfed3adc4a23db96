"""TransformerLens backward hooks, run by hand where a GIM rule bypasses a hook point's autograd node.

TSG sends its gradient from ``hook_pattern`` straight to the scores, and the norm freeze of a fused norm
replaces the norm's whole backward, so autograd never passes the hook points in between (``hook_pattern``,
``hook_attn_scores``, a bridge norm's ``hook_in``). A user's backward hooks there must still see the
gradient, so the rule's backward runs them itself, as PyTorch would have: the hooks bound at forward time,
in order, each seeing the incoming gradient, the last one that returns a tensor setting what flows on.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gim_tl._internals import hookpoint_backward_hooks


def bound_backward_hooks(point) -> list[Callable]:
    """The backward hooks on a HookPoint right now. PyTorch binds this list when the forward passes the
    point, so a rule that bypasses the point reads it in forward too."""
    return hookpoint_backward_hooks(point)


def run_backward_hooks(point, hook_fns: list[Callable], grad: Tensor) -> Tensor:
    """Run a HookPoint's backward hooks ``hook_fns`` on ``grad`` as PyTorch would; returns what flows on."""
    result = (grad,)
    for fn in hook_fns:
        out = fn(point, result, (grad,))
        if out is not None:
            result = out
    return result[0]
