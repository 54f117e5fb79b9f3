"""A backbone's graph nodes, classifier and blocks as models/backbone/meta.json records them (`Anatomy`), and the
graph node a `backbone.cut` names. Read by every stage that loads models/backbone, so it imports no torch: the
anatomy is computed from the model once, by download (backbone/anatomy.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from transfer_learning.common.errors import UserError


@dataclass(frozen=True)
class Block:
    name: str  # module path, e.g. "features.17" or "layer4"
    output_node: str  # graph node whose output is this block's output


@dataclass(frozen=True)
class Anatomy:
    node_names: list[str]
    classifier: str
    penultimate_node: str
    blocks: list[Block]

    def to_json(self) -> dict:
        return {**asdict(self), "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_json(cls, data: dict) -> Anatomy:
        return cls(data["node_names"], data["classifier"], data["penultimate_node"],
                   [Block(**b) for b in data["blocks"]])

    def cut_node(self, cut: int | str) -> str:
        """The graph node a `backbone.cut` value names."""
        if cut == "penultimate":
            return self.penultimate_node
        if isinstance(cut, int):
            if not 1 <= cut <= len(self.blocks):
                raise UserError(
                    f"backbone.cut={cut}: this backbone has {len(self.blocks)} blocks "
                    f"({self.blocks[0].name} … {self.blocks[-1].name}); valid: 1..{len(self.blocks)}"
                )
            return self.blocks[cut - 1].output_node
        if cut not in self.node_names or cut == self.node_names[0]:
            close = [n for n in self.node_names if n.startswith(cut.split(".")[0])][:12]
            raise UserError(
                f"backbone.cut={cut!r} is not a graph node of this backbone; valid: penultimate, 1..{len(self.blocks)}, "
                f"or a node name from models/backbone/meta.json node_names (e.g. {', '.join(close or self.node_names[1:9])})"
            )
        return cut
