"""Which blocks a sweep covers (`layers.blocks`), numbered as `backbone.cut: N` counts them, and the output name
each block's pooled features get in the one sweep graph."""
from __future__ import annotations

from dataclasses import dataclass

from transfer_learning.backbone.anatomy import Anatomy
from transfer_learning.common.errors import UserError


@dataclass(frozen=True)
class SweepBlock:
    number: int  # 1-based: `backbone.cut: number` keeps the backbone up to this block
    name: str  # module path, e.g. "features.17"
    node: str  # the graph node whose output is the block's output

    @property
    def output(self) -> str:
        return f"block_{self.number:03d}"


def chosen_blocks(blocks: str | list[int], anatomy: Anatomy) -> list[SweepBlock]:
    every = [SweepBlock(i + 1, b.name, b.output_node) for i, b in enumerate(anatomy.blocks)]
    if blocks == "all":
        return every
    wrong = sorted({n for n in blocks if not 1 <= n <= len(every)})
    if wrong:
        raise UserError(f"layers.blocks: {wrong} not blocks of this backbone; valid: all, or numbers 1..{len(every)} "
                        "(" + ", ".join(f"{b.number}={b.name}" for b in every) + ")")
    return [every[n - 1] for n in sorted(set(blocks))]
