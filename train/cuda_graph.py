"""Run the training step as one CUDA graph (`train.cuda_graph`), or eagerly: the same function either way.

On a GPU this loop is paced by the host: a step launches a few hundred small kernels, each from
Python, and the GPU waits between them. A CUDA graph records those launches once and replays
them with one call. What makes that correct is the step's contract: it reads only tensors that
stay at the same addresses (the batch, latent and EMA-weight buffers the loop fills before each
step, the networks, the optimizers' states) and leaves its results in tensors that do too (the
window sums, the fault record); no host synchronisation and no host-side decision inside it.

Single process only (DDP's all-reduce would have to be captured too), and not with fp16 loss
scaling or `train.on_nonfinite=skip`: each needs the host inside the step. With `train.compile`
the warm-up steps compile the networks (D in both its forms: with and without gradients for its
weights) and the capture records the kernels torch.compile generated: fused kernels, one launch.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable

import torch

WARMUP_STEPS = 3  # real steps, run eagerly on a side stream before the capture (cuDNN/cuBLAS set-up, optimizer state)


class ReplayableStep:
    """Calls `step(*arguments)` eagerly, or (enabled) for each distinct tuple of arguments warms up,
    captures once and from then on replays that graph (the arguments are baked into it)."""

    def __init__(self, step: Callable[..., None], enabled: bool):
        self.step = step
        self.enabled = enabled
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.warmed_up: Counter[tuple] = Counter()

    def __call__(self, *arguments: Hashable) -> None:
        if not self.enabled:
            self.step(*arguments)
        elif arguments in self.graphs:
            self.graphs[arguments].replay()
        elif self.warmed_up[arguments] < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(*arguments)
            torch.cuda.current_stream().wait_stream(side)
            self.warmed_up[arguments] += 1
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records this step's kernels without running them
                self.step(*arguments)
            self.graphs[arguments] = graph
            graph.replay()

    def reset(self) -> None:
        """Forget the graphs: after tensors they read were replaced (an optimizer's state_dict loaded)."""
        self.graphs.clear()
        self.warmed_up.clear()
