"""Pass infrastructure: a pass is a small frozen dataclass with a kebab-case name; its fields are its
options. Calling it returns (graph, modified). The manager runs a pipeline of named passes, verifies
between passes in debug mode, and reports a failure as "pass 'X' failed after ['A', 'B']".
"""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Iterable

from ..errors import IRError, PassError
from ..ir import Graph, verify


@dataclasses.dataclass(frozen=True)
class Pass:
    name: ClassVar[str]
    summary: ClassVar[str]

    def __call__(self, graph: Graph) -> tuple[Graph, bool]:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> Pass:
    if name not in PASSES:
        raise PassError(f"unknown pass '{name}'; known passes: {', '.join(PASSES)}")
    return PASSES[name]()


def run_pipeline(graph: Graph, passes: Iterable[str | Pass], *, debug: bool = True,
                 on_pass: Callable[[str, Graph, bool], None] | None = None) -> Graph:
    """Run passes in order; `debug` verifies the graph after each one (and before the first)."""
    done: list[str] = []
    if debug:
        verify(graph)
    for item in passes:
        p = get_pass(item) if isinstance(item, str) else item
        try:
            result = p(graph)
            if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Graph)
                    and isinstance(result[1], bool)):
                raise PassError(f"pass '{p.name}' broke the pass contract after {done}: it must return "
                                f"(graph, modified: bool), returned {type(result).__name__} {result!r:.80}")
            graph, modified = result
            if debug:
                verify(graph)
        except IRError as err:
            raise PassError(f"pass '{p.name}' failed after {done}: {err}") from err
        done.append(p.name)
        graph.meta["pipeline"] = ",".join(done)
        if on_pass is not None:
            on_pass(p.name, graph, modified)
    return graph
