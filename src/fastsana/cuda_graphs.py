"""CUDA graphs for the DiT during sampling: record one forward, replay it at every step.

A sampler calls the DiT 10-50 times with the same shapes and, within one image, the same
caption. Run eagerly, every call launches some thirty kernels per block from Python; for
Sana-0.6B at 1024 px on an H100 that launch work takes longer than the kernels themselves
(docs/benchmarks.md, "GPU"). A CUDA graph records the kernels of one forward once and
launches them all with a single call.

``GraphedTransformer`` wraps a ``SanaTransformer`` for calls ``(x, t, context)`` with a
``TextContext`` (``prepare_text``'s output):

- the first call with a new set of shapes runs eagerly (it also warms up: cuBLAS handles,
  Triton compilation) and then records a graph whose inputs are private copies of
  ``x``, ``t`` and the context;
- later calls copy their inputs into those copies (a new caption's K/V too, when the context
  object changes) and replay the graph; the output is cloned, because the next replay
  overwrites the graph's output buffer.

Graphs are kept per set of shapes, the ``max_graphs`` most recently recorded ones (each holds
its activations' memory). If recording fails (a model with an operation CUDA graphs cannot
hold), the wrapper warns once and stays eager. Inference only; weights must not be replaced
while graphs exist (they are recorded by address; in-place updates are seen), so call
``reset()`` after swapping them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from fastsana.models.dit import SanaTransformer, TextContext

logger = logging.getLogger(__name__)


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    x: Tensor  # the graph's inputs (private copies the caller's inputs are copied into)
    t: Tensor
    context: TextContext
    out: Tensor  # the graph's output buffer
    source: TextContext  # the caller's context whose values ``context`` holds now


def _copy_context(context: TextContext) -> TextContext:
    kv = tuple((k.clone(), v.clone()) for k, v in context.kv)
    return TextContext(kv=kv, bias=None if context.bias is None else context.bias.clone())


def _load_context(dst: TextContext, src: TextContext) -> None:
    for (dk, dv), (sk, sv) in zip(dst.kv, src.kv, strict=True):
        dk.copy_(sk)
        dv.copy_(sv)
    if dst.bias is not None:
        dst.bias.copy_(src.bias)


def _shape_key(x: Tensor, t: Tensor, context: TextContext) -> tuple:
    k, _ = context.kv[0]
    return (
        tuple(x.shape),
        x.dtype,
        tuple(t.shape),
        t.dtype,
        len(context.kv),
        tuple(k.shape),
        k.dtype,
        None if context.bias is None else (tuple(context.bias.shape), context.bias.dtype),
    )


class GraphedTransformer:
    """``transformer(x, t, context)``, replayed from CUDA graphs; see the module docstring."""

    def __init__(self, transformer: SanaTransformer, max_graphs: int = 4) -> None:
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        self.transformer = transformer
        self.max_graphs = max_graphs
        self.replays = 0  # graph replays so far (a test and a benchmark read it)
        self._graphs: dict[tuple, _Recorded] = {}
        self._pool = None
        self._failed = False

    def reset(self) -> None:
        """Drop every recorded graph (and the memory they hold)."""
        self._graphs.clear()
        self._pool = None

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, context: TextContext) -> Tensor:
        if x.device.type != "cuda" or self._failed:
            return self.transformer(x, t, context)
        key = _shape_key(x, t, context)
        recorded = self._graphs.get(key)
        if recorded is None:
            out = self.transformer(x, t, context)  # eager: this call's result and the warm-up
            self._record(key, x, t, context)
            return out
        recorded.x.copy_(x)
        recorded.t.copy_(t)
        if recorded.source is not context:  # a new caption with the same shapes
            _load_context(recorded.context, context)
            recorded.source = context
        recorded.graph.replay()
        self.replays += 1
        return recorded.out.clone()

    def _record(self, key: tuple, x: Tensor, t: Tensor, context: TextContext) -> None:
        static_x, static_t, static_context = x.clone(), t.clone(), _copy_context(context)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.transformer(static_x, static_t, static_context)
        except RuntimeError as error:  # e.g. a host synchronisation inside the forward
            self._failed = True
            logger.warning("CUDA graph recording failed, running the DiT eagerly: %s", error)
            return
        if len(self._graphs) >= self.max_graphs:  # forget the oldest recording
            del self._graphs[next(iter(self._graphs))]
        self._graphs[key] = _Recorded(graph, static_x, static_t, static_context, out, context)
