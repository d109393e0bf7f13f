"""Replaying a function's kernels from a CUDA graph: one launch where there are hundreds.

Pays on CUDA: the 3-way step at 256 px went from 3111 to 6868 images/s on an H200 (doc/gpu_runs.md).
The batched augmentation dispatches about 1300 small kernels, whose launches kept the host busy
longer than the whole model step took on the GPU; a graph records them once and each replay
launches them all in one call.
"""
import torch

from support.errors import CutPasteError


class GraphedCall:
    """Calls `fn()` on CUDA by replaying a CUDA graph of it; elsewhere, or when disabled, calls it as it is.

    fn takes no arguments and returns a tuple of tensors whose shapes never change. It must not read
    anything back to the host, and the tensors it reads (the image cache) must stay where they are.
    Random numbers must come from `generators`, which are registered with the graph: each replay
    draws what the next eager call would have drawn, so the run's random stream does not depend on
    whether the graph is used.

    The first call runs fn eagerly on a side stream (the warm-up PyTorch asks for before a capture),
    returns that result, and captures one call into the graph. Later calls replay the graph and
    return clones of its outputs, so no result is overwritten by the next call. A capture that
    fails is an error naming the fix, not a silent fallback: a generator registered with a failed
    capture may be left in capture mode, and its later draws could not be trusted.
    """

    def __init__(self, fn, device: torch.device, generators=(), enabled: bool = True):
        self.fn = fn
        self.device = device
        self.generators = tuple(generators)
        self.enabled = enabled and device.type == "cuda"
        self.graph = None
        self.outputs = ()

    def __call__(self):
        if not self.enabled:
            return self.fn()
        if self.graph is None:
            with torch.cuda.device(self.device):  # the capture's own stream is made on the current device
                return self._warm_up_and_capture()
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)

    def _warm_up_and_capture(self):
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            first = tuple(self.fn())
        current.wait_stream(side)
        for t in first:  # made on the side stream, used on the current one: keep their memory until then
            t.record_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            for gen in self.generators:
                graph.register_generator_state(gen)
            with torch.cuda.graph(graph):
                self.outputs = tuple(self.fn())
        except RuntimeError as err:
            torch.cuda.set_stream(current)  # a capture_end that raises leaves the capture stream current
            raise CutPasteError(f"could not capture the step's batch in a CUDA graph ({str(err)[:300]}); "
                                f"rerun with --no-cuda_graph to build it launch by launch") from err
        self.graph = graph
        return first
