"""Region emitter: splice a torch module computing new values from existing graph values into an FX program or an
ONNX graph, replacing some values and/or adding named graph outputs.

A :class:`Region` names the graph values a module reads (``inputs``), the values its first outputs take over
(``replaces``: every use, graph outputs included, whose names are kept) and the names of the new graph outputs its
remaining outputs become (``adds``). The module returns one tensor when the region produces one value, else a tuple
in that order. This is the attention emitters' splice, generalized for the site kinds that are not attention:
classifier heads (replace the logits), OOD scores (add ``ood_score``), post-processing (replace and add).

FX: one ``call_module`` per region, the program re-exported with the model's dynamic axes (parameters stay
trainable). ONNX: each module is exported with the torch ONNX exporter (plain standard ops, no custom domain), its
nodes are moved into the model under ``softswap/<region>/`` names, dead nodes removed and the graph sorted.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import onnx
import onnx_ir as ir
import torch
import torch.fx as fx

from .errors import UnsupportedModelError
from .io import LoadedModel, quiet_stdout

log = logging.getLogger(__name__)

#: The opset replacement modules are exported at; older models are upgraded by :func:`prepare_onnx`.
REGION_OPSET = 18


@dataclass
class Region:
    """Where a module goes: the values it reads, the values it replaces, the graph outputs it adds."""

    name: str
    inputs: Sequence[Any]
    replaces: Sequence[Any] = ()
    adds: Sequence[str] = ()
    rule: str = ""
    _n: int = field(default=0, init=False, repr=False)

    @property
    def n_outputs(self) -> int:
        return len(self.replaces) + len(self.adds)


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name) or "region"


def _unpack(outputs: Any, n: int, region: Region) -> list[Any]:
    if n == 1:
        return [outputs]
    if not isinstance(outputs, (tuple, list)) or len(outputs) != n:
        raise UnsupportedModelError(f"region {region.name}: the module must return {n} values "
                                    f"({len(region.replaces)} replaced + adds {list(region.adds)})")
    return list(outputs)


# ------------------------------------------------------------------------------------------------------------
# FX
# ------------------------------------------------------------------------------------------------------------
def splice_fx(model: LoadedModel, gm: fx.GraphModule, parts: Sequence[tuple[Region, torch.nn.Module]]
              ) -> LoadedModel:
    """Splice each (region, module) into ``gm`` (= ``model.ep.module()``, whose nodes the regions name) and
    re-export. Returns the new FX model; its ``output_names`` are the old ones followed by every region's adds."""
    from .emit_fx import _drop_orphan_assertions, reexport
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    out_node = next(n for n in graph.nodes if n.op == "output")
    added_nodes: list[fx.Node] = []
    added_names: list[str] = []
    taken_outputs = set(model.output_names)
    for region, module in parts:
        _check_adds(region, taken_outputs)
        attr, i = f"softswap_{_ident(region.name)}", 1
        while hasattr(gm, attr):
            attr, i = f"softswap_{_ident(region.name)}_{i}", i + 1
        gm.add_submodule(attr, module)
        inputs = list(region.inputs)
        anchor = max((v for v in inputs if isinstance(v, fx.Node)), key=lambda v: order[v])
        with graph.inserting_after(anchor):
            call = graph.call_module(attr, args=tuple(inputs))
        call.meta["rw.rule"] = region.rule or f"region:{region.name}"
        outs = [call]
        if region.n_outputs > 1:
            outs = []
            cursor = call
            for index in range(region.n_outputs):
                with graph.inserting_after(cursor):
                    cursor = graph.call_function(__import__("operator").getitem, (call, index))
                outs.append(cursor)
        new_nodes = {call, *outs}
        for old, new in zip(region.replaces, outs):
            users_before = [u for u in old.users if u not in new_nodes and order.get(u, 1 << 30) < order[anchor]]
            if users_before:
                raise UnsupportedModelError(f"region {region.name}: {old.name} is used before the region's inputs "
                                            f"are computed ({users_before[0].name}); cannot replace it there")
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in new_nodes)
        added_nodes.extend(outs[len(region.replaces):])
        added_names.extend(region.adds)
    if added_nodes:
        leaves = list(torch.utils._pytree.tree_leaves(out_node.args[0]))
        out_node.args = (tuple(leaves + added_nodes),)
        codegen = graph._codegen
        info = getattr(codegen, "pytree_info", None)
        if info is not None:
            _, spec = torch.utils._pytree.tree_flatten(tuple(range(len(leaves) + len(added_nodes))))
            codegen.pytree_info = info._replace(out_spec=spec)
    _drop_orphan_assertions(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    ep = reexport(model, gm)
    return LoadedModel(kind="fx", source=model.source, ep=ep, example_inputs=model.example_inputs,
                       input_names=model.input_names, output_names=list(model.output_names) + added_names,
                       extra=dict(model.extra))


def _check_adds(region: Region, taken: set[str]) -> None:
    for name in region.adds:
        if not name or name in taken:
            raise UnsupportedModelError(f"region {region.name}: the model already has an output named {name!r}")
        taken.add(name)


# ------------------------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------------------------
def prepare_onnx(model: LoadedModel) -> ir.Model:
    """A clone of ``model``'s ONNX graph at opset ≥ :data:`REGION_OPSET` (upgraded when older), for regions to
    name values of and :func:`splice_onnx` to edit."""
    from .emit_onnx import upgrade_opset
    clone = model.onnx.clone()
    if clone.opset_imports.get("", REGION_OPSET) < REGION_OPSET:
        clone = upgrade_opset(clone, REGION_OPSET)
    return clone


def _export(module: torch.nn.Module, region: Region, examples: Sequence[torch.Tensor], opset: int) -> ir.Model:
    dynamic = []
    for value, example in zip(region.inputs, examples):
        shape = value.shape
        free = range(example.dim()) if shape is None else [a for a, d in enumerate(shape) if not isinstance(d, int)]
        axes = {a: torch.export.Dim.AUTO for a in free if example.shape[a] != 1}
        dynamic.append(axes or None)
    names = [f"in{i}" for i in range(len(examples))]
    try:
        with quiet_stdout():
            program = torch.onnx.export(module.eval(), tuple(examples), dynamo=True, opset_version=opset,
                                        dynamic_shapes=tuple(dynamic) if any(dynamic) else None, input_names=names,
                                        output_names=[f"out{i}" for i in range(region.n_outputs)], optimize=True,
                                        verbose=False)
    except Exception as exc:
        from .errors import first_line
        from .interrupts import reraise_if_interrupted
        reraise_if_interrupted(exc)
        raise UnsupportedModelError(f"region {region.name}: exporting the replacement to ONNX failed "
                                    f"({first_line(exc)}) [culprit: {region.name}]") from exc
    # a proto round trip gives the sub-graph values of its own (no sharing with the exporter's program)
    return ir.from_proto(onnx.ModelProto.FromString(ir.to_proto(program.model).SerializeToString()))


def _unique(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def splice_onnx(model: LoadedModel, onnx_model: ir.Model, parts: Sequence[tuple[Region, torch.nn.Module]],
                examples: Mapping[str, Sequence[torch.Tensor]]) -> LoadedModel:
    """Splice each (region, module) into ``onnx_model`` (from :func:`prepare_onnx`; the regions name its values).

    ``examples[region.name]``: example tensors of the region's inputs (their sizes consistent with each other, ≥ 2
    along every free axis so the exporter keeps it free). Returns the new ONNX model; its ``output_names`` are the
    old ones followed by every region's adds."""
    opset = onnx_model.opset_imports.get("", REGION_OPSET)
    if opset < REGION_OPSET:
        raise UnsupportedModelError(f"{model.source}: regions need opset >= {REGION_OPSET}; use prepare_onnx()")
    graph = onnx_model.graph
    taken = {v.name for n in graph for v in n.outputs if v.name} | set(graph.initializers) | \
        {v.name for v in graph.inputs}
    taken_outputs = {o.name for o in graph.outputs}
    added_names: list[str] = []
    for region, module in parts:
        _check_adds(region, taken_outputs)
        sub = _export(module, region, examples[region.name], opset)
        prefix = f"softswap/{region.name}/"
        sub_graph = sub.graph
        for sub_in, main_in in zip(list(sub_graph.inputs), region.inputs):
            sub_in.replace_all_uses_with(main_in)
        for name in list(sub_graph.initializers):
            value = sub_graph.initializers.pop(name)
            value.name = _unique(taken, prefix + name)
            graph.register_initializer(value)
        new_outs = list(sub_graph.outputs)
        sub_graph.outputs.clear()
        nodes = list(sub_graph)
        for node in nodes:
            sub_graph.remove(node)
            node.name = prefix + (node.name or node.op_type)
            node.metadata_props["rw.rule"] = region.rule or f"region:{region.name}"
            for out in node.outputs:
                if out.name:
                    out.name = _unique(taken, prefix + out.name)
        graph.extend(nodes)
        for domain, version in sub.opset_imports.items():
            onnx_model.opset_imports.setdefault(domain, version)
        for fid, fn in sub.functions.items():
            onnx_model.functions.setdefault(fid, fn)
        own = {id(n) for n in nodes}
        for old, new in zip(region.replaces, new_outs):
            keep = [(u, i) for u, i in old.uses() if id(u) in own]  # the region may read what it replaces
            is_output = any(o is old for o in graph.outputs)
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            for user, index in keep:
                user.replace_input_with(index, old)
            new.type = old.type if new.type is None else new.type
            if is_output:
                old_name = old.name
                old.name = _unique(taken, old_name + "_replaced")
                new.name = old_name
        for value, name in zip(new_outs[len(region.replaces):], region.adds):
            if name in taken:
                clash = next((v for n in graph for v in n.outputs if v.name == name), None)
                if clash is not None:
                    clash.name = _unique(taken, name + "_inner")
            value.name = name
            taken.add(name)
            graph.outputs.append(value)
            added_names.append(name)
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass
    RemoveUnusedNodesPass()(onnx_model)
    TopologicalSortPass()(onnx_model)
    return LoadedModel(kind="onnx", source=model.source, onnx=onnx_model, example_inputs=model.example_inputs,
                       input_names=model.input_names, output_names=list(model.output_names) + added_names,
                       extra=dict(model.extra))
