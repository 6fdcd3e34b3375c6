"""Relax compilation pipelines: the project's CPU pipeline (every loop nest scheduled) and the CUDA pipeline.

CPU, in order (inside ``with target:``, dlight needs ``Target.current()``):

0. :func:`targets.bitlinear_route.RouteBitLinear` - ``matmul(where(x >= 0, 1, -1), ±1 constant)`` becomes the
   bit-packed XNOR/popcount kernels of :mod:`targets.bitlinear`;
0b. :func:`targets.attention_route.RouteAttention` - static ``matmul -> [scale] -> [+mask] -> softmax -> matmul``
   chains become one fused attention kernel (:mod:`targets.attention_kernel`);
1. :func:`RouteSoftmax` - last-axis float32 ``R.nn.softmax`` becomes ``reshape -> call_tir(hand kernel of
   targets.softmax_kernels) -> reshape`` (a static shape: the rule table's kernel; symbolic dims: the run-time-shaped
   fused three-pass kernel);
2. ``FastMathTransform`` for the rest (softmax -> fast_softmax, exp -> fast_exp: no libm ``expf`` calls);
3. ``cpu_generic`` library dispatch + legalize (LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR);
4. ``ApplyDefaultSchedule`` with :func:`targets.cpu_rules.cpu_rules` (never ``dl.cpu.GEMV``);
5. dataflow lowering + ``cpu_generic.finalize_passes``.

CUDA: TVM's own GPU pipeline (``relax.get_default_pipeline``) with dlight GPU rules, after routing cumsums with
run-time dims (:mod:`targets.gpu_cumsum`).
"""

from __future__ import annotations

import logging
import os

from . import _env  # noqa: F401
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cg
from tvm.s_tir import dlight as dl

from .attention_route import RouteAttention
from .bitlinear_route import RouteBitLinear
from .cpu_rules import cpu_rules
from .relax_util import rewrite_functions, routing_pass
from .softmax_kernels import (choose_kernel, make_softmax_kernel, make_symbolic_softmax_kernel, mcpu_of,
                              rows_cols, vector_bits_of)

log = logging.getLogger(__name__)


#: The hand softmax kernels index with int32; larger tensors keep TVM's own (int64-indexed) softmax.
MAX_KERNEL_ELEMENTS = 1 << 31


def num_threads() -> int:
    """Threads of the TVM pool (``TVM_NUM_THREADS``)."""
    try:
        return int(os.environ.get("TVM_NUM_THREADS", "1"))
    except ValueError:
        return 1


def _static_shape(sinfo) -> list[int] | None:
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        dims = [int(d) for d in sinfo.shape.values]
    except (TypeError, AttributeError):
        return None
    return dims


@relax.expr_functor.mutator
class _SoftmaxRouter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod)
        self.mod_ = mod
        self.bits = vector_bits_of(target)
        self.mcpu = mcpu_of(target)
        self.threads = num_threads()
        self.kernels: dict = {}
        self.routed = 0

    def visit_call_(self, call):  # noqa: D401
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.softmax":
            return call
        sinfo = call.args[0].ty
        shape = _static_shape(sinfo)
        if shape is None:
            return self._route_symbolic(call, sinfo)
        if sinfo.dtype != "float32" or not shape:
            return call
        axis = int(call.attrs.axis)
        if axis not in (-1, len(shape) - 1):
            return call
        rows, cols = rows_cols(shape)
        if rows * cols == 0:
            return call
        if rows * cols >= MAX_KERNEL_ELEMENTS:
            log.info("softmax of %d elements left to TVM's own lowering (hand kernels index with int32)", rows * cols)
            return call
        choice = choose_kernel(rows, cols, self.bits, self.threads, self.mcpu)
        return self._call_kernel((rows, cols, choice), f"softmax_{choice.algo}_{choice.layout}_{rows}x{cols}",
                                 lambda: make_softmax_kernel(rows, cols, choice), call.args[0], rows, cols, shape)

    def _call_kernel(self, key, name: str, make, x, rows, cols, shape):
        """``x`` reshaped to (rows, cols), the kernel ``key`` applied (added to the module once, built by ``make``),
        reshaped back to ``shape``; counts one routed softmax."""
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(make().with_attr("global_symbol", name), name)
        x2 = self.builder_.emit(relax.op.reshape(x, (rows, cols)))
        y2 = self.builder_.emit(relax.call_tir(self.kernels[key], [x2], relax.TensorType((rows, cols), "float32")))
        self.routed += 1
        return relax.op.reshape(y2, shape)

    def _route_symbolic(self, call, sinfo):
        """A last-axis fp32 softmax whose shape has symbolic dims: one run-time-shaped fused three-pass kernel
        (:func:`targets.softmax_kernels.make_symbolic_softmax_kernel`) serves every such softmax of the module."""
        if not isinstance(sinfo, relax.TensorType) or sinfo.dtype != "float32" or sinfo.shape is None:
            return call
        dims = list(getattr(sinfo.shape, "values", None) or [])
        if not dims:
            return call
        axis = int(call.attrs.axis)
        if axis not in (-1, len(dims) - 1):
            return call
        rows = tvm.tirx.const(1, "int64")
        for d in dims[:-1]:
            rows = rows * d
        cols = dims[-1]
        return self._call_kernel(("symbolic", self.bits), f"softmax_three_pass_symbolic_v{self.bits // 32}",
                                 lambda: make_symbolic_softmax_kernel(self.bits // 32), call.args[0], rows, cols, dims)

    def run(self) -> tvm.IRModule:
        return rewrite_functions(self)


def RouteSoftmax(target: tvm.target.Target):  # noqa: N802 - pass constructor naming, like TVM's
    """Module pass replacing static last-axis fp32 softmax by the hand kernels (see module docstring)."""
    return routing_pass("RouteSoftmax", lambda mod: _SoftmaxRouter(mod, target),
                        "routed %d softmax call(s) to hand kernels", log_when_none=True, logger=log)


def _guarded_fuse_transpose_matmul() -> tvm.transform.Pass:
    """TVM's ``FuseTransposeMatmul``, skipped (module unchanged, logged) where it raises: its pattern code reads
    ``.dtype`` of every matched argument and fails on tuple-typed values (SOFT's Newton-Schulz graph), and indexes a
    second argument that a symbolic-length attention graph's matched call does not have."""

    @tvm.transform.module_pass(opt_level=0, name="GuardedFuseTransposeMatmul")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        try:
            return relax.transform.FuseTransposeMatmul()(mod)
        except (AttributeError, IndexError, tvm.error.InternalError, ValueError) as exc:  # noqa: PERF203
            log.info("FuseTransposeMatmul skipped: %s", str(exc).splitlines()[0][:200])
            return mod

    return _pass


def schedule_passes(target: tvm.target.Target, route_softmax: bool = True,
                    tuning_dir: str | None = None, route_bitlinear: bool = True,
                    route_attention: bool = True) -> list:
    """Steps 1-4 of the CPU pipeline (routing, fast math, fusion, legalization, schedules), shared by
    :func:`cpu_pipeline` and :func:`scheduled_module`; call inside ``with target:``."""
    passes = [RouteBitLinear(target)] if route_bitlinear else []
    # --- fused softmax attention (targets.attention_route); before softmax routing, which would take its softmax
    passes += [RouteAttention(target)] if route_attention else []
    passes += [RouteSoftmax(target)] if route_softmax else []
    passes.append(relax.transform.FastMathTransform())
    # matmul(a, permute_dims(b)) -> one matmul reading b transposed: no materialized transpose
    passes.append(_guarded_fuse_transpose_matmul())
    passes += cg.library_dispatch_passes(target) + cg.legalize_passes(target)
    if tuning_dir:
        passes.append(relax.transform.MetaScheduleApplyDatabase(tuning_dir))
    passes.append(dl.ApplyDefaultSchedule(*cpu_rules()))
    return passes


def cpu_pipeline(target: tvm.target.Target, route_softmax: bool = True,
                 tuning_dir: str | None = None, route_bitlinear: bool = True,
                 route_attention: bool = True) -> tvm.transform.Pass:
    """The project's CPU Relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)``.

    ``tuning_dir``: a MetaSchedule database (see :mod:`targets.tuning`); its best schedules are applied before the
    default rules, which then only schedule what the database does not cover.  ``route_bitlinear=False`` leaves
    binary linears to TVM's float matmul (for comparisons); ``route_attention=False`` keeps softmax attention
    unfused (matmul, routed softmax kernel, matmul).
    """

    @tvm.transform.module_pass(opt_level=0, name="SoftswapCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = schedule_passes(target, route_softmax, tuning_dir, route_bitlinear, route_attention)
            passes += [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
            ]
            passes += cg.finalize_passes(target)
            mod = tvm.transform.Sequential(passes)(mod)
        return mod

    return _pipeline


def gpu_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CUDA pipeline (legalize, fuse, dlight GPU Matmul/GEMV/Reduction/GeneralReduction/Fallback, lower),
    after :func:`targets.gpu_cumsum.RouteSymbolicCumsum` (cumsums over a non-last axis with run-time dims, which
    TVM's scan cannot lower)."""
    from .gpu_cumsum import RouteSymbolicCumsum

    return tvm.transform.Sequential([RouteSymbolicCumsum(), relax.get_default_pipeline(target)])


def pipeline_for(target: tvm.target.Target, tuning_dir: str | None = None) -> tvm.transform.Pass:
    """The pipeline matching a target's kind (``tuning_dir`` applies to CPU targets)."""
    if str(target.kind.name) == "cuda":
        return gpu_pipeline(target)
    return cpu_pipeline(target, tuning_dir=tuning_dir)


def compile_relax(mod: tvm.IRModule, target: tvm.target.Target, tuning_dir: str | None = None):
    """``tvm.compile`` a Relax module with :func:`pipeline_for`; returns the VM executable."""
    return tvm.compile(mod, target=target, relax_pipeline=pipeline_for(target, tuning_dir))


def scheduled_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Run the CPU pipeline up to scheduling (steps 1-4) and return the module, for inspection and tests."""
    with target:
        return tvm.transform.Sequential(schedule_passes(target))(mod)


def loop_report(mod: tvm.IRModule) -> dict[str, dict]:
    """Per PrimFunc: ``{"parallel": bool, "vectorized": bool, "work": iterations of the largest loop nest}``."""
    from tvm import tirx

    report = {}
    for gv, f in mod.functions_items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        info = {"parallel": False, "vectorized": False, "work": 1}

        text = f.script()
        info["parallel"] = "T.parallel(" in text
        info["vectorized"] = "T.vectorized(" in text
        import re

        total = 0
        for dims in re.findall(r"T\.Buffer\(\((.*?)\), \"", text):
            n = 1
            for d in re.findall(r"(?<![\w.])(\d+)(?![\w.])", dims.replace("T.int64", "")):
                n *= int(d)
            total = max(total, n)
        info["work"] = total
        report[gv.name_hint] = info
    return report
