"""targets.bench.benchmark returns latency percentiles for every runtime given."""

import numpy as np
import torch

from targets.bench import benchmark

from tgt_models import softmax_matmul_model


def test_benchmark_tvm_ort_torch():
    proto = softmax_matmul_model(n=32)
    x = np.random.default_rng(0).standard_normal((8, 32, 32)).astype(np.float32)
    w = torch.from_numpy(np.frombuffer(proto.graph.initializer[0].raw_data, np.float32).reshape(32, 32).copy())
    res = benchmark(proto, "avx2", {"x": x}, runs=3, warmup=1, threads=1,
                    torch_module=lambda t: torch.softmax(t @ w, -1))
    for key in ("tvm", "ort", "torch"):
        assert res[key]["runs"] == 3 and 0 < res[key]["p50"] <= res[key]["p99"] + 1e-9
