"""Where BiViT binarises: from each recognised attention site to the Linears of its transformer block (FX).

The rule (docs/bivit.md, "recognition"), for an attention site with values q, k, v, output:

- **q / k / v projections**: walk up from the site's q (k, v) value through layout-only ops (view, reshape,
  transpose, permute, contiguous, clone, eval dropout, ...) to an ``aten.linear`` whose weight is a parameter
  (``get_attr``) used by nothing else. The three projections must be distinct and read the same input.
- **output projection**: walk down from the site's output through layout-only ops, each the only user of the
  previous value, to an ``aten.linear`` (same weight rule) reading the chain.
- **MLP**: from the output projection, down (single users, layout-only ops) to the residual ``add``; the MLP input
  is the one ``layer_norm`` (or ``rms_norm``) among the users of that add (pre-norm ViT/DeiT, and post-norm
  blocks alike). From the norm: down to ``fc1`` (a Linear reading the chain), then one
  elementwise activation (GELU, ReLU, SiLU, ...), then ``fc2`` (a Linear), whose output must reach an ``add`` (a
  residual connection).

Anything else (packed QKV, gated MLPs, matmul against a computed weight, shared weights) is refused with a
:class:`~rewrite.sites.Reason`; the pass never guesses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from rewrite.sites import AttentionSite, NoMatch, Reason

aten = torch.ops.aten

#: Ops that move or copy values without computing on them.
LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
              aten.permute.default, aten.contiguous.default, aten.clone.default, aten.alias.default,
              aten.unsqueeze.default, aten.squeeze.dim, aten.flatten.using_ints, aten.unflatten.int,
              aten.t.default}
#: Elementwise activations accepted between fc1 and fc2.
ACTIVATIONS = {aten.gelu.default, aten.relu.default, aten.silu.default, aten.gelu_.default, aten.relu_.default,
               aten.silu_.default, aten.hardswish.default, aten.sigmoid.default, aten.tanh.default,
               aten.mish.default, aten.elu.default, aten.leaky_relu.default}
NORMS = {aten.layer_norm.default, getattr(aten, "rms_norm").default if hasattr(aten, "rms_norm") else None}
NORMS.discard(None)
ADDS = {aten.add.Tensor, aten.add_.Tensor}
#: How far a walk through layout-only ops may go.
MAX_STEPS = 12


def _is_passthrough(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in LAYOUT_OPS:
        return True
    if node.target is aten.dropout.default:  # eval dropout (train=False) or p = 0
        p = node.args[1] if len(node.args) > 1 else 0.5
        train = node.args[2] if len(node.args) > 2 else True
        return (not train) or p == 0
    return False


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return type(node).__name__
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


def linear_weight_reason(node: fx.Node) -> Optional[str]:
    """None when ``node`` is ``aten.linear(x, W, b)`` with W (and b) parameters used only by it; else why not."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return f"{_describe(node)} is not aten.linear"
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return "its weight is computed, not a parameter"
    if len(weight.users) != 1:
        return f"its weight {weight.target} is shared with {len(weight.users) - 1} other use(s)"
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr" or len(bias.users) != 1):
        return "its bias is computed or shared"
    return None


def _up_to_linear(value: Any, role: str) -> fx.Node:
    node = value
    for _ in range(MAX_STEPS):
        if not isinstance(node, fx.Node):
            break
        if node.op == "call_function" and node.target is aten.linear.default:
            why = linear_weight_reason(node)
            if why:
                raise NoMatch(Reason(node.name, _describe(node), f"{role} projection with its own weight", why))
            return node
        if not _is_passthrough(node):
            raise NoMatch(Reason(node.name, _describe(node), f"layout-only ops up to the {role} projection Linear",
                                 _describe(node)))
        node = node.args[0]
    raise NoMatch(Reason(getattr(value, "name", str(value)), _describe(value), f"the {role} projection Linear "
                         f"within {MAX_STEPS} layout-only ops", _describe(node)))


def _down(node: fx.Node, what: str, stop: Any) -> tuple[fx.Node, fx.Node]:
    """Follow single users through layout-only ops from ``node`` to the first user satisfying ``stop``:
    (the value it reads, that user)."""
    current = node
    for _ in range(MAX_STEPS):
        users = list(current.users)
        if len(users) != 1:
            raise NoMatch(Reason(current.name, _describe(current), f"a single use on the way to {what}",
                                 f"{len(users)} uses"))
        nxt = users[0]
        if stop(nxt):
            return current, nxt
        if not _is_passthrough(nxt) or nxt.args[0] is not current:
            raise NoMatch(Reason(nxt.name, _describe(nxt), f"layout-only ops down to {what}", _describe(nxt)))
        current = nxt
    raise NoMatch(Reason(node.name, _describe(node), f"{what} within {MAX_STEPS} ops", "a longer chain"))


def _linear_on(chain_end: fx.Node, role: str) -> fx.Node:
    def stop(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target is aten.linear.default
    read, lin = _down(chain_end, f"the {role} Linear", stop)
    if lin.args[0] is not read:
        raise NoMatch(Reason(lin.name, _describe(lin), f"{role} Linear reading the chain", "another input"))
    why = linear_weight_reason(lin)
    if why:
        raise NoMatch(Reason(lin.name, _describe(lin), f"{role} Linear with its own weight", why))
    return lin


@dataclass
class BlockLinears:
    """The Linears of one transformer block found from an attention site (FX nodes), or the reasons for a miss."""

    site: AttentionSite
    attention: dict[str, fx.Node] = field(default_factory=dict)  # q, k, v, o
    mlp: dict[str, fx.Node] = field(default_factory=dict)        # fc1, fc2
    attention_reason: Optional[Reason] = None
    mlp_reason: Optional[Reason] = None


def _attention_linears(site: AttentionSite) -> dict[str, fx.Node]:
    found = {role: _up_to_linear(value, role) for role, value in (("q", site.q), ("k", site.k), ("v", site.v))}
    if len({n.name for n in found.values()}) != 3:
        raise NoMatch(Reason(found["q"].name, "aten.linear", "three distinct q/k/v projections",
                             "a shared projection (packed QKV)"))
    inputs = {found[r].args[0] for r in found}
    if len(inputs) != 1:
        raise NoMatch(Reason(found["k"].name, "aten.linear", "q/k/v projections reading the same hidden states",
                             f"{len(inputs)} different inputs (cross-attention?)"))
    if not isinstance(site.output, fx.Node):
        raise NoMatch(Reason(str(site.output), "output", "an FX node", type(site.output).__name__))
    found["o"] = _linear_on(site.output, "output")
    return found


def _mlp_linears(o_proj: fx.Node) -> dict[str, fx.Node]:
    _, residual = _down(o_proj, "the residual add", lambda n: n.op == "call_function" and n.target in ADDS)
    norms = [u for u in residual.users if u.op == "call_function" and u.target in NORMS]
    if len(norms) != 1:
        raise NoMatch(Reason(residual.name, "add", "exactly one layer_norm/rms_norm reading the residual stream",
                             f"{len(norms)} norm(s) among {len(residual.users)} uses"))
    norm = norms[0]

    def is_linear(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target is aten.linear.default
    fc1 = _linear_on(norm, "MLP fc1")
    _, act = _down(fc1, "the MLP activation", lambda n: n.op == "call_function" and (n.target in ACTIVATIONS
                                                                                  or is_linear(n)))
    if act.target not in ACTIVATIONS:
        raise NoMatch(Reason(act.name, _describe(act), "an elementwise activation after fc1", _describe(act)))
    fc2 = _linear_on(act, "MLP fc2")
    _down(fc2, "the residual add after fc2", lambda n: n.op == "call_function" and n.target in ADDS)
    return {"fc1": fc1, "fc2": fc2}


def block_linears(site: AttentionSite) -> BlockLinears:
    """The q/k/v/o and fc1/fc2 Linears of ``site``'s block; a part that does not match carries its Reason."""
    block = BlockLinears(site)
    try:
        block.attention = _attention_linears(site)
    except NoMatch as exc:
        block.attention_reason = exc.reason
        return block
    try:
        block.mlp = _mlp_linears(block.attention["o"])
    except NoMatch as exc:
        block.mlp_reason = exc.reason
    return block
