"""A small layered layout for workflow graphs, rendered as SVG by the templates."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

NODE_WIDTH = 180
NODE_HEIGHT = 44
GAP_X = 70
GAP_Y = 24
MARGIN = 16


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """A step placed on the canvas (top-left corner at x, y)."""

    id: str
    label: str
    state: str
    x: int
    y: int
    href: str | None = None
    dependencies: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Edge:
    """An arrow from the right edge of one step to the left edge of a dependent step."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def path(self) -> str:
        """A cubic Bézier path (numbers only, safe to put in an attribute)."""
        middle = (self.x1 + self.x2) // 2
        return f"M{self.x1},{self.y1} C{middle},{self.y1} {middle},{self.y2} {self.x2},{self.y2}"


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    """Nodes, edges and canvas size."""

    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """Input: one step of a workflow with the ids it depends on."""

    id: str
    state: str
    dependencies: tuple[str, ...] = ()
    label: str | None = None
    href: str | None = None


def layout(steps: Iterable[Step]) -> Layout:
    """Place each step in the column after its deepest dependency (cycles and unknown
    dependencies are tolerated: they are ignored for placement)."""
    by_id: Mapping[str, Step] = {s.id: s for s in steps}
    depth: dict[str, int] = {}

    def depth_of(step_id: str, visiting: frozenset[str]) -> int:
        if step_id in depth:
            return depth[step_id]
        visiting = visiting | {step_id}
        deps = [d for d in by_id[step_id].dependencies if d in by_id and d not in visiting]
        value = 1 + max((depth_of(d, visiting) for d in deps), default=-1)
        depth[step_id] = value
        return value

    for step_id in by_id:
        depth_of(step_id, frozenset())
    columns: dict[int, list[str]] = {}
    for step_id in by_id:
        columns.setdefault(depth[step_id], []).append(step_id)
    positions: dict[str, tuple[int, int]] = {}
    nodes: list[Node] = []
    for column, ids in sorted(columns.items()):
        for row, step_id in enumerate(ids):
            x = MARGIN + column * (NODE_WIDTH + GAP_X)
            y = MARGIN + row * (NODE_HEIGHT + GAP_Y)
            positions[step_id] = (x, y)
            step = by_id[step_id]
            label = step.label or step_id
            if len(label) > 24:
                label = label[:23] + "…"
            nodes.append(Node(step_id, label, step.state, x, y, step.href, step.dependencies))
    edges = []
    for step in by_id.values():
        for dep in step.dependencies:
            if dep in positions:
                (x1, y1), (x2, y2) = positions[dep], positions[step.id]
                edges.append(
                    Edge(x1 + NODE_WIDTH, y1 + NODE_HEIGHT // 2, x2, y2 + NODE_HEIGHT // 2)
                )
    width = MARGIN * 2 + max((n.x for n in nodes), default=0) + NODE_WIDTH
    height = MARGIN * 2 + max((n.y for n in nodes), default=0) + NODE_HEIGHT
    return Layout(nodes, edges, width, height)
