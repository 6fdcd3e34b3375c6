"""ONNX emitter: export a site's :class:`~rewrite.binding.SiteModule` with the torch ONNX exporter and splice the
resulting graph into the model in place of the site.

The replacement is plain standard ops (no custom domain), so the result runs in onnxruntime without softswap.
Exports are cached per (variant, options, site spec, input signature, parameter values): a 12-layer model with
untrained (equal) parameters costs one export, not twelve; fitted per-site parameters get one export each.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import onnx
import onnx_ir as ir
import torch

from .errors import UnsupportedModelError
from .graph.onnx_graph import OnnxGraph
from .io import quiet_stdout
from .sites import AttentionSite

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "bool": torch.bool, "int64": torch.int64, "int32": torch.int32}
_SIZES = (3, 5, 7, 11, 13, 17, 19, 23)


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name) or "d"


def site_signature(g: OnnxGraph, site: AttentionSite, captured: Sequence[torch.Tensor] | None = None
                   ) -> tuple[list[torch.Tensor], list[dict[int, Any]], tuple]:
    """Example tensors, dynamic axes and a hashable signature for the site's inputs (q, k, v, mask terms).

    Example tensors are the ``captured`` site values when given (their sizes are consistent by construction);
    otherwise they are made from the graph's shapes. Every axis that is not a static size in the graph is exported
    as ``Dim.AUTO``, so the exporter works out which axes are equal or derived.
    """
    values = [site.q, site.k, site.v, *[t.value for t in site.mask_terms]]
    symbols: dict[str, int] = {}
    tensors: list[torch.Tensor] = []
    dynamic: list[dict[int, Any]] = []
    signature = []
    for index, value in enumerate(values):
        shape, dtype = g.shape(value), g.dtype(value)
        if dtype not in _TORCH_DTYPES:
            raise UnsupportedModelError(f"site {site.name}: input {g.value_name(value)!r} has dtype {dtype}")
        example = captured[index] if captured is not None else None
        if shape is None:
            if example is None:
                raise UnsupportedModelError(f"site {site.name}: input {g.value_name(value)!r} has no known shape")
            shape = tuple(None for _ in example.shape)
        axes = {axis: torch.export.Dim.AUTO for axis, d in enumerate(shape) if not isinstance(d, int)}
        if example is None:
            if any(d is None for d in shape):
                raise UnsupportedModelError(f"site {site.name}: input {g.value_name(value)!r} has unknown dims "
                                            f"{shape} and no sample values to size them")
            concrete = []
            for d in shape:
                if not isinstance(d, int) and d not in symbols:
                    symbols[d] = _SIZES[len(symbols) % len(_SIZES)] + 8 * (len(symbols) // len(_SIZES))
                concrete.append(d if isinstance(d, int) else symbols[d])
            torch_dtype = _TORCH_DTYPES[dtype]
            example = torch.ones(concrete, dtype=torch.bool) if torch_dtype == torch.bool else \
                torch.randn(concrete).to(torch_dtype)
        axes = {a: d for a, d in axes.items() if example.shape[a] != 1}  # size-1 axes broadcast: keep static
        tensors.append(example)
        dynamic.append(axes)
        signature.append((tuple(shape), dtype))
    return tensors, dynamic, tuple(signature)


class OnnxSiteExporter:
    """Exports site modules to ONNX sub-graphs, cached by ``key`` (the caller includes the parameter values: the
    exporter may fold parameters into constants, so only equal parameters may share a sub-graph)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self._cache: dict[Any, bytes] = {}

    def export(self, module: torch.nn.Module, key: Any, tensors: list[torch.Tensor],
               dynamic: list[dict[int, Any]], site_name: str) -> ir.Model:
        proto = self._cache.get(key)
        if proto is None:
            names = ["q", "k", "v"] + [f"mask{i}" for i in range(len(tensors) - 3)]
            dyn = tuple(d or None for d in dynamic[:3])
            if len(dynamic) > 3:
                dyn = dyn + (tuple(d or None for d in dynamic[3:]),)
            try:
                with quiet_stdout():
                    program = torch.onnx.export(module, tuple(tensors), dynamo=True, opset_version=self.opset,
                                            dynamic_shapes=dyn if any(d for d in dynamic) else None, input_names=names,
                                            output_names=["out"], optimize=True, verbose=False)
            except Exception as exc:
                from .errors import first_line
                from .interrupts import reraise_if_interrupted
                reraise_if_interrupted(exc)
                raise UnsupportedModelError(f"site {site_name}: exporting the replacement to ONNX failed "
                                            f"({first_line(exc)}) [culprit: {site_name}]") from exc
            proto = ir.to_proto(program.model).SerializeToString()
            self._cache[key] = proto
        return ir.from_proto(onnx.ModelProto.FromString(proto))


def _unique(graph: ir.Graph, taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def splice(model: ir.Model, g: OnnxGraph, site: AttentionSite, sub: ir.Model) -> None:
    """Move ``sub``'s nodes into ``model`` before the site's output node and reroute the site's output."""
    graph = model.graph
    anchor = site.output.producer()
    inputs = [site.q, site.k, site.v, *[t.value for t in site.mask_terms]]
    taken = {v.name for n in graph for v in n.outputs if v.name} | set(graph.initializers)
    prefix = f"softswap/{site.name}/"
    sub_graph = sub.graph
    for sub_in, main_in in zip(list(sub_graph.inputs), inputs):
        sub_in.replace_all_uses_with(main_in)
    for name in list(sub_graph.initializers):
        value = sub_graph.initializers.pop(name)
        value.name = _unique(graph, taken, prefix + name)
        graph.register_initializer(value)
    new_out = sub_graph.outputs[0]
    sub_graph.outputs.clear()
    nodes = list(sub_graph)
    for node in nodes:
        sub_graph.remove(node)
        node.name = prefix + (node.name or node.op_type)
        node.metadata_props["rw.rule"] = f"attention:{site.name}"
        for out in node.outputs:
            if out.name:
                out.name = _unique(graph, taken, prefix + out.name)
    graph.insert_before(anchor, nodes)
    for domain, version in sub.opset_imports.items():
        if domain not in model.opset_imports:
            model.opset_imports[domain] = version
    for fid, fn in sub.functions.items():
        model.functions.setdefault(fid, fn)
    old = site.output
    new_out.type, new_out.shape = old.type, old.shape
    is_output = any(o is old for o in graph.outputs)
    old.replace_all_uses_with(new_out, replace_graph_outputs=True)
    if is_output:
        old_name = old.name
        old.name = _unique(graph, taken, old_name + "_replaced")
        new_out.name = old_name


def finish(model: ir.Model) -> None:
    """Drop the nodes the splices left dead and restore topological order."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass
    RemoveUnusedNodesPass()(model)
    TopologicalSortPass()(model)


def upgrade_opset(model: ir.Model, opset: int) -> ir.Model:
    """Convert ``model`` to ``opset`` with the ONNX version converter (names are kept)."""
    from onnx import version_converter
    try:
        proto = version_converter.convert_version(ir.to_proto(model), opset)
    except Exception as exc:
        from .errors import first_line
        raise UnsupportedModelError(f"cannot convert the model from opset {model.opset_imports.get('')} to "
                                    f"{opset} for the replacement ops ({first_line(exc)})") from exc
    upgraded = ir.from_proto(proto)
    # The proto round trip drops where external weights live (the model's folder): keep the original tensors.
    external = {name: v.const_value for name, v in model.graph.initializers.items()
                if isinstance(v.const_value, ir.ExternalTensor)}
    for name, value in upgraded.graph.initializers.items():
        if name in external and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = external[name]
    return upgraded
