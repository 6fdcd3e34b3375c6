"""The binarised (W1A1, deploy form) ViT exported to ONNX compiles with targets for ``host`` and matches
onnxruntime. When the 1-bit kernel of targets/ recognises the contract form, this is the model it runs."""
from __future__ import annotations

import os

import numpy as np
import onnx

os.environ.setdefault("TVM_NUM_THREADS", "1")


def test_binarised_vit_compiles_for_host_and_matches_onnxruntime(tmp_path):
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from rewrite import api
    from targets.artifact import build
    from targets.importer import import_onnx
    from tests.digits_models import digits_split
    from tests.vit_digits import export_vit, untrained_vit

    new, _ = api.convert(export_vit(untrained_vit()), binarize="bivit", verify=False)
    path = api.export(new, tmp_path / "bivit.onnx")
    x = digits_split().x_test[:8]
    imported = import_onnx(onnx.load(str(path)), shapes={"pixel_values": list(x.shape)})
    vm = relax.VirtualMachine(build(imported, "host"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    ref = ort.InferenceSession(str(path)).run(None, {"pixel_values": x})[0]
    assert got.shape == ref.shape == (8, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
