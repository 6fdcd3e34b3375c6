"""Small readers of Relax IR and the module-pass plumbing shared by the routing passes (attention, binary linear,
softmax, CUDA cumsum).

Each reader answers one question about an expression and never raises on an expression of another kind: it
returns a neutral value ("" / None) instead, so a pattern check can chain them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from . import _env  # noqa: F401
import numpy as np
import tvm
from tvm import relax


def op_name(expr) -> str:
    """The operator name of a call to a Relax op (``"relax.matmul"``), "" for anything else."""
    return expr.op.name if isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) else ""


def tensor_const(value) -> np.ndarray | None:
    """The array of a Relax tensor constant (``tvm.ir.GenericConst`` in TVM 0.27), else None."""
    if not isinstance(value, tvm.ir.GenericConst):
        return None
    data = value.value
    return data.numpy() if isinstance(data, tvm.runtime.Tensor) else None


def dim_product(dims):
    """Product of tensor dims: an int when every dim is an int, else a TIR expression (symbolic extents)."""
    out = 1
    for d in dims:
        out = out * d
    return out


def rewrite_functions(mutator, before_each: Callable[[relax.Function], None] | None = None) -> tvm.IRModule:
    """Run a ``relax.PyExprMutator`` built on a module over each of that module's Relax functions and return the
    rewritten module; ``before_each(func)`` lets the mutator read a function (its bindings, use counts) first."""
    for gv, func in mutator.mod_.functions_items():
        if isinstance(func, relax.Function):
            if before_each is not None:
                before_each(func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def routing_pass(name: str, make_router: Callable[[tvm.IRModule], Any], summary: str, *,
                 drop_dead_code: bool = False, log_when_none: bool = False,
                 report: Callable[[Any], None] | None = None,
                 logger: logging.Logger | None = None) -> tvm.transform.Pass:
    """A module pass that builds a router (an object with ``run() -> IRModule`` and a ``routed`` count) on the
    module, runs it, removes the bindings it left dead (``drop_dead_code``, only when it routed something) and logs
    ``summary % routed`` at INFO on ``logger`` (the caller's module logger; also for zero when ``log_when_none``);
    ``report(router)`` logs anything more."""
    log = logger or logging.getLogger(__name__)

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        router = make_router(mod)
        out = router.run()
        if router.routed and drop_dead_code:
            out = relax.transform.DeadCodeElimination()(out)
        if router.routed or log_when_none:
            log.info(summary, router.routed)
        if report is not None:
            report(router)
        return out

    return _pass
