"""A small ONNX graph writer for the directly built exports: fresh value names, constants shared
by the main graph and its subgraphs (initializers of the main graph), and node lists.

A subgraph (a ``Loop`` body) reads the main graph's initializers and values from the outer
scope, so every constant is an initializer of the main graph whichever graph uses it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class GraphWriter:
    """Names and initializers of one model; ``Nodes`` objects collect the nodes of a graph."""

    def __init__(self) -> None:
        self.initializers: list[Any] = []
        self._constants: dict[str, np.ndarray] = {}
        self._count = 0

    def fresh(self) -> str:
        self._count += 1
        return f"t{self._count}"

    def const(self, name: str, value: object, dtype: Any = None) -> str:
        """The initializer ``name`` holding ``value`` (created at first use; a second use with
        a different value is a bug in the caller)."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        known = self._constants.get(name)
        if known is None:
            self._constants[name] = array
            self.initializers.append(numpy_helper.from_array(array, name))
        elif known.dtype != array.dtype or not np.array_equal(known, array):
            raise AssertionError(f"constant {name!r} defined twice with different values")
        return name

    def nodes(self) -> Nodes:
        return Nodes(self)


class Nodes:
    """The node list of one graph (the main graph or a subgraph)."""

    def __init__(self, writer: GraphWriter) -> None:
        self.writer = writer
        self.nodes: list[Any] = []

    def op(self, op_type: str, inputs: list[str], name: str = "", **attrs: Any) -> str:
        return self.ops(op_type, inputs, 1, name, **attrs)[0]

    def ops(
        self, op_type: str, inputs: list[str], count: int, name: str = "", **attrs: Any
    ) -> list[str]:
        from onnx import helper

        outputs = [self.writer.fresh() for _ in range(count)]
        node_name = name or f"{op_type}_{outputs[0]}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs

    def named(self, op_type: str, inputs: list[str], output: str, name: str, **attrs: Any) -> None:
        """A node writing the value ``output`` (a graph output) itself."""
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
