"""Each private or undocumented PyTorch / TransformerLens interface in ``gim_tl._internals``, checked directly.

If one of these fails after an upgrade, the interface changed under gim_tl: fix ``_internals.py`` (and only it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gim_tl import _internals as internals
from gim_tl.hook_shim import run_backward_hooks


def test_softmax_backward_into_is_the_softmax_backward_formula_even_in_place():
    """``p ⊙ (g − Σ p g)`` (float64 by hand), into a separate buffer and written over ``p`` itself."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 5, 7, generator=gen), -1)
    g = torch.randn(3, 5, 7, generator=gen)
    want = p.double() * (g.double() - (p.double() * g.double()).sum(-1, keepdim=True))
    out = internals.softmax_backward_into(g, p, torch.empty_like(p))
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-7)
    over_p = p.clone()
    result = internals.softmax_backward_into(g, over_p, over_p)
    assert result.data_ptr() == over_p.data_ptr(), "the output buffer must be the one passed in"
    torch.testing.assert_close(result.double(), want, rtol=1e-6, atol=1e-7)


def test_autograd_node_names():
    """The node names gim_tl matches: a product, a sum, rsqrt, and a full backward hook's wrapper."""
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    assert (a * b).grad_fn.name() == internals.MUL_NODE
    assert (a + b).grad_fn.name() == internals.ADD_NODE
    assert torch.rsqrt(a.abs() + 1).grad_fn.name() == internals.RSQRT_NODE
    module = nn.Identity()
    module.register_full_backward_hook(lambda m, gin, gout: None)
    assert module(a * b).grad_fn.name() == internals.BACKWARD_HOOK_NODE


def test_next_functions_lists_the_inputs_nodes_in_argument_order():
    """``graph_node`` walks ``next_functions`` by index (index i = the op's i-th input) and checks names."""
    x = torch.randn(3, requires_grad=True)
    scaled = x * 2
    y = scaled.exp() + x.sin()
    assert internals.graph_node(y.grad_fn, (0, 0), ("ExpBackward0", internals.MUL_NODE)) is scaled.grad_fn
    assert internals.graph_node(y.grad_fn, (), ()) is y.grad_fn
    assert internals.graph_node(y.grad_fn, (1,), ("ExpBackward0",)) is None  # index 1 is sin's node
    assert internals.graph_node(y.grad_fn, (0, 5), ("ExpBackward0", internals.MUL_NODE)) is None
    leaf = internals.graph_node(y.grad_fn, (0, 0, 0),
                                ("ExpBackward0", internals.MUL_NODE, "torch::autograd::AccumulateGrad"))
    assert leaf is not None and leaf.variable is x
    found = {names: node for _, names, node in internals.graph_nodes(y.grad_fn)}
    assert found[("ExpBackward0", internals.MUL_NODE)] is scaled.grad_fn


def test_product_node_steps_over_a_backward_hook_wrapper():
    gate, up, b = (torch.randn(2, 4, requires_grad=True) for _ in range(3))
    module = nn.Identity()
    module.register_full_backward_hook(lambda m, gin, gout: None)
    product = nn.functional.silu(gate) * up
    assert internals.product_node(module(product), (internals.MUL_NODE,)) is product.grad_fn
    with_bias = nn.functional.silu(gate) * up + b
    node = internals.product_node(with_bias, (internals.ADD_NODE, internals.MUL_NODE))
    assert node is with_bias.grad_fn.next_functions[0][0] and node.name() == internals.MUL_NODE
    assert internals.product_node(gate.exp() + up, (internals.MUL_NODE,)) is None


def test_hookpoint_backward_hooks_are_the_tl_hooks_in_order():
    """A HookPoint's backward hooks, as TL registers them, found in ``_backward_hooks`` in order, each called
    with PyTorch's full-backward-hook arguments; a returned tensor replaces the gradient (last one wins)."""
    from transformer_lens.hook_points import HookPoint

    point = HookPoint()
    seen = []
    point.add_hook(lambda grad, hook: seen.append(("first", grad.clone())), dir="bwd")
    point.add_hook(lambda grad, hook: 3 * grad, dir="bwd")
    fns = internals.hookpoint_backward_hooks(point)
    assert len(fns) == 2
    grad = torch.randn(4)
    out = run_backward_hooks(point, fns, grad)
    assert seen[0][0] == "first" and torch.equal(seen[0][1], grad) and torch.equal(out, 3 * grad)
    # The same hooks, run by autograd through the point, give the same result.
    x = torch.randn(4, requires_grad=True)
    point(x).backward(grad)
    assert torch.equal(x.grad, out) and torch.equal(seen[1][1], grad)
    point.remove_hooks(dir="bwd")
    assert internals.hookpoint_backward_hooks(point) == []


def test_hookpoint_without_backward_hooks_dict_fails_loudly():
    class Odd:
        pass

    with pytest.raises(RuntimeError, match="_backward_hooks"):
        internals.hookpoint_backward_hooks(Odd())


def test_permanent_forward_hook_is_the_newest_handle_and_removes_alone():
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Tiny(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.hook_x = HookPoint()
            self.setup()

        def forward(self, x):
            return self.hook_x(x)

    model = Tiny()
    calls = []
    model.add_hook("hook_x", lambda x, hook: calls.append("user"), dir="fwd")
    gim_fn = lambda x, hook: calls.append("gim")  # noqa: E731
    handle = internals.add_permanent_forward_hook(model, "hook_x", gim_fn, model.hook_x)
    model.reset_hooks()  # permanent hooks survive it
    model(torch.zeros(1))
    assert calls == ["gim"]
    assert internals.forward_hooks_of(model.hook_x) == [(gim_fn, True)]
    assert internals.forward_hook_count(model.hook_x) == 1
    model.add_hook("hook_x", lambda x, hook: calls.append("user"), dir="fwd")
    assert internals.forward_hook_count(model.hook_x) == 2
    internals.remove_forward_hook(model.hook_x, handle)
    model(torch.zeros(1))
    assert calls == ["gim", "user"] and handle not in model.hook_x.fwd_hooks
    ((user_hook, permanent),) = internals.forward_hooks_of(model.hook_x)
    assert not permanent and user_hook is not gim_fn


def test_hf_attention_implementation_is_set_to_eager():
    """An HF model built for SDPA runs eager attention afterwards, read back from the config field."""
    import tiny_models as tm

    hf = tm.hf_model("llama")
    hf.config._attn_implementation = "sdpa"
    internals.use_eager_attention(hf)
    assert hf.config._attn_implementation == "eager"
