"""Section (e) of tools/bench/lowering.py: long-K small-output matmul φ(K)ᵀV (einsum 'bhnd,bhne->bhde', B = 1,
H = 8, d = e = 64, K = N) — TVM with MatmulRule's tiled schedule vs the K-split schedule vs numpy (batched matmul,
its BLAS) vs onnxruntime (the same Einsum graph), timed in alternating rounds at 1 and 2 threads.

Also a reduction over a non-innermost axis, ``k.sum(-2)`` of (1, 8, N, 64): TVM's stock rules (strided column walks)
vs :class:`targets.cpu_rules.StridedReductionRule` (vectorized across the kept axis) vs numpy vs onnxruntime.

Run through ``lowering.py --only ksplit``; returns rows for its JSON.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper


def kv_model(h: int, n: int, d: int):
    """ONNX Einsum φ(K)ᵀV for inputs k, v of shape (1, h, n, d)."""
    g = helper.make_graph([helper.make_node("Einsum", ["k", "v"], ["y"], equation="bhnd,bhne->bhde")], "kv",
                          [helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, h, n, d]),
                           helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, h, n, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, h, d, d])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def bench_ksplit(quick: bool, time_interleaved, threads_list=(1, 2), h: int = 8, d: int = 64) -> list[dict]:
    """Rows ``{"n", "threads", "impl", "ms", "gflops"}``; ``time_interleaved`` is lowering.py's timer."""
    import threadpoolctl

    import targets.cpu_rules as rules
    from targets.bench import ort_session, set_tvm_threads, tvm_callable

    rows = []
    for n in ([4096] if quick else [4096, 16384]):
        rng = np.random.default_rng(0)
        k = rng.standard_normal((1, h, n, d)).astype(np.float32)
        v = rng.standard_normal((1, h, n, d)).astype(np.float32)
        model = kv_model(h, n, d)
        want = np.einsum("bhnd,bhne->bhde", k.astype(np.float64), v.astype(np.float64))
        fns = {}
        saved = rules.KSPLIT_MIN_K
        try:
            for impl, min_k in (("TVM tiled", 1 << 62), ("TVM K-split", saved)):
                rules.KSPLIT_MIN_K = min_k
                fns[impl] = tvm_callable(model, "host", {"k": k, "v": v})
                out = fns[impl]()
                got = (out if hasattr(out, "numpy") else out[0]).numpy()
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), impl
        finally:
            rules.KSPLIT_MIN_K = saved
        kt = np.ascontiguousarray(k.transpose(0, 1, 3, 2))
        fns["numpy"] = lambda: np.matmul(kt, v)
        for threads in threads_list:
            set_tvm_threads(threads)
            sess = ort_session(model, threads)
            fns["ORT"] = lambda: sess.run(None, {"k": k, "v": v})
            with threadpoolctl.threadpool_limits(threads):
                ms = time_interleaved(fns, 1.0 if quick else 4.0)
            for impl, t in ms.items():
                gflops = 2 * h * n * d * d / (t * 1e-3) / 1e9
                rows.append({"n": n, "threads": threads, "impl": impl, "ms": round(t, 3), "gflops": round(gflops, 1)})
                print(f"   φ(K)ᵀV N={n:5d} {threads}T {impl:>12} {t:8.2f} ms {gflops:6.1f} GFLOP/s "
                      f"({ms['TVM tiled'] / t:.2f}x tiled)")
    return rows


def reduce_model(h: int, n: int, d: int):
    """ONNX ReduceSum over axis 2 of x (1, h, n, d)."""
    from onnx import numpy_helper

    g = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)], "rs",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h, n, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, h, d])],
                          [numpy_helper.from_array(np.array([2], np.int64), "axes")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def bench_strided_reduction(quick: bool, time_interleaved, threads_list=(1, 2), h: int = 8,
                            d: int = 64) -> list[dict]:
    """Rows ``{"n", "threads", "impl", "ms"}`` for ``x.sum(-2)``."""
    import threadpoolctl

    import targets.cpu_rules as rules
    from targets.bench import ort_session, set_tvm_threads, tvm_callable

    rows = []
    for n in ([4096] if quick else [4096, 16384]):
        x = np.random.default_rng(0).standard_normal((1, h, n, d)).astype(np.float32)
        model = reduce_model(h, n, d)
        want = x.astype(np.float64).sum(2)
        fns = {}
        apply = rules.StridedReductionRule.apply
        try:
            for impl, rule_on in (("TVM stock rules", False), ("TVM strided rule", True)):
                rules.StridedReductionRule.apply = apply if rule_on else (lambda self, *a: None)
                fns[impl] = tvm_callable(model, "host", {"x": x})
                out = fns[impl]()
                got = (out if hasattr(out, "numpy") else out[0]).numpy()
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), impl
        finally:
            rules.StridedReductionRule.apply = apply
        fns["numpy"] = lambda: x.sum(2)
        for threads in threads_list:
            set_tvm_threads(threads)
            sess = ort_session(model, threads)
            fns["ORT"] = lambda: sess.run(None, {"x": x})
            with threadpoolctl.threadpool_limits(threads):
                ms = time_interleaved(fns, 1.0 if quick else 3.0)
            for impl, t in ms.items():
                rows.append({"n": n, "threads": threads, "impl": impl, "ms": round(t, 3)})
                print(f"   sum(-2) N={n:5d} {threads}T {impl:>16} {t:8.2f} ms "
                      f"({ms['TVM stock rules'] / t:.2f}x stock)")
    return rows
