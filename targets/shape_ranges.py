"""Input shapes a compiled artefact is built for: fixed dims and ``lo..hi`` ranges of symbolic dims.

``softswap compile M --shape input_ids=1..32,1..4096 --shape pixel_values=1,3,224,224`` fixes the dims given as
integers and keeps the dims given as ranges symbolic: one artefact serves every size inside its ranges.  The ranges
are recorded in the artefact metadata (``"ranges"``: {input name: [[lo, hi] or null per dim]}) and
:class:`targets.Runner` refuses an input outside them before executing (one line naming the input, the dim and
the range).

A range given for one input also holds for every other input dim that the model names with the same symbol
(``attention_mask`` shares ``batch`` and ``seq`` with ``input_ids``).

Shapes as passed around (:data:`ShapeSpec`): ``{input name: [dim, ...]}`` with a dim an ``int`` (fixed) or a
``(lo, hi)`` pair of ints, ``1 <= lo <= hi`` (a range; lists of two ints are accepted too).
"""
from __future__ import annotations

from typing import Sequence, Union

from .errors import InputError

Dim = Union[int, tuple[int, int]]
ShapeSpec = dict[str, list[Dim]]


def is_range(dim) -> bool:
    """True for a ``(lo, hi)`` range, False for a fixed int dim."""
    return isinstance(dim, (tuple, list))


def parse_dim(text: str, item: str) -> Dim:
    """``"8"`` -> 8, ``"1..4096"`` -> (1, 4096); anything else (zero, negative, reversed range) is an
    :class:`InputError` naming the ``--shape`` item."""
    text = text.strip()
    try:
        if ".." in text:
            lo_text, hi_text = text.split("..", 1)
            lo, hi = int(lo_text), int(hi_text)
            if 1 <= lo <= hi:
                return (lo, hi)
        else:
            value = int(text)
            if value >= 1:
                return value
    except ValueError:
        pass
    raise InputError(f"--shape {item!r}: each dim is a positive integer or a range lo..hi with 1 <= lo <= hi, "
                     f"got {text!r}", culprit=item)


def has_ranges(shapes: ShapeSpec | None) -> bool:
    """Whether any dim of ``shapes`` is a range."""
    return any(is_range(d) for dims in (shapes or {}).values() for d in dims)


def fixed_only(shapes: ShapeSpec | None) -> dict[str, list[int]] | None:
    """The inputs of ``shapes`` all of whose dims are fixed (None when there are none)."""
    fixed = {name: [int(d) for d in dims] for name, dims in (shapes or {}).items()
             if not any(is_range(d) for d in dims)}
    return fixed or None


def resolve_ranges(shapes: ShapeSpec | None, inputs: Sequence[dict]) -> dict[str, list]:
    """The ``"ranges"`` metadata record: {input name: [[lo, hi] or None per dim]} for every input with a ranged
    dim, ``inputs`` being the imported signature (``{"name", "shape"}``, symbolic dims as strings).

    A range must fall on a symbolic dim of the imported model (else :class:`InputError` naming input and dim);
    it extends to every input dim with the same symbol; two different ranges for one symbol are refused.
    """
    by_name = {i["name"]: i for i in inputs}
    symbols: dict[str, tuple[int, int]] = {}
    origin: dict[str, str] = {}
    for name, dims in (shapes or {}).items():
        spec = by_name.get(name)
        if spec is None:
            raise InputError(f"--shape {name}=...: the model has no input {name!r} (inputs: {sorted(by_name)})",
                             culprit=name)
        for axis, dim in enumerate(dims):
            if not is_range(dim):
                continue
            lo, hi = int(dim[0]), int(dim[1])
            model_dim = spec["shape"][axis] if axis < len(spec["shape"]) else None
            if not isinstance(model_dim, str):
                raise InputError(f"--shape {name}: dim {axis} is fixed at {model_dim} in the imported model; a "
                                 f"range {lo}..{hi} needs a symbolic dim", culprit=name)
            previous = symbols.get(model_dim)
            if previous is not None and previous != (lo, hi):
                raise InputError(f"--shape {name}: dim {axis} ({model_dim!r}) given range {lo}..{hi}, but "
                                 f"{origin[model_dim]} gives it {previous[0]}..{previous[1]}", culprit=name)
            symbols[model_dim] = (lo, hi)
            origin[model_dim] = f"{name} dim {axis}"
    ranges: dict[str, list] = {}
    for spec in inputs:
        dims = [list(symbols[d]) if isinstance(d, str) and d in symbols else None for d in spec["shape"]]
        if any(d is not None for d in dims):
            ranges[spec["name"]] = dims
    return ranges


def check_in_ranges(ranges: dict[str, list] | None, name: str, shape: Sequence[int]) -> None:
    """Refuse (:class:`InputError`: the input, the dim, its size and the compiled range) an input array of
    ``shape`` with a dim outside the artefact's recorded ``ranges``."""
    for axis, (size, dim) in enumerate(zip(shape, (ranges or {}).get(name, []))):
        if dim is not None and not int(dim[0]) <= int(size) <= int(dim[1]):
            raise InputError(f"input {name!r} dim {axis} is {size}, outside the range {dim[0]}..{dim[1]} this "
                             "artefact was compiled for", culprit=name)
