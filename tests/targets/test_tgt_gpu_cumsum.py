"""targets.gpu_cumsum: cumsums over a non-last axis with run-time dims become TVM's serial axis-1 scan kernel.

No GPU is needed: the routed module's kernels are run on the CPU with their thread bindings turned into serial loops
(same TIR otherwise), against numpy's cumsum in float64, at several shapes through one compiled module."""

import re

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import from_source

from targets.gpu_cumsum import RouteSymbolicCumsum


def _cumsum_module(shape, axis, exclusive=False):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.cumsum(x, axis=axis, exclusive=exclusive)))
        bb.emit_func_output(out)
    return bb.get()


def _serial_on_cpu(mod: tvm.IRModule):
    """The module with every ``T.thread_binding`` loop of its PrimFuncs made a serial loop, built for the CPU."""
    funcs = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            f = from_source(re.sub(r'T\.thread_binding\((.*?), thread="[^"]*"\)', r"T.serial(\1)", f.script()))
        funcs[gv] = f
    return relax.VirtualMachine(tvm.compile(tvm.IRModule(funcs), target="llvm"), tvm.cpu())


def _calls(mod: tvm.IRModule) -> str:
    return mod["main"].script()


def test_symbolic_middle_axis_cumsum_routed_and_matches_numpy():
    b, n = tirx.Var("b", "int64"), tirx.Var("n", "int64")
    routed = RouteSymbolicCumsum()(_cumsum_module([b, 3, n, 4, 5], axis=2))
    text = _calls(routed)
    assert "relax.cumsum" not in text and "R.cumsum" not in text and "cumsum_axis1_float32_float32" in text
    vm = _serial_on_cpu(routed)
    rng = np.random.default_rng(0)
    for shape in ((2, 3, 7, 4, 5), (1, 3, 1, 4, 5), (3, 3, 300, 4, 5)):
        a = rng.standard_normal(shape).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(a)).numpy()
        want = np.cumsum(a.astype(np.float64), axis=2)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), shape


def test_static_last_axis_and_exclusive_cumsums_left_to_tvm():
    n = tirx.Var("n", "int64")
    for mod in (_cumsum_module([2, 7, 4], axis=1), _cumsum_module([2, 4, n], axis=-1),
                _cumsum_module([2, n, 4], axis=1, exclusive=True)):
        assert "cumsum_axis1" not in _calls(RouteSymbolicCumsum()(mod))
