"""Replaying a function's kernels from a CUDA graph: one launch where there are hundreds.

The batched augmentation launches about 1300 small kernels a step; on CUDA, launching them one by one takes the
host longer than the model step takes the GPU, and one replay of a graph does not (measurements: doc/performance.md,
doc/gpu_runs.md)."""
import torch

from common.errors import CutPasteError


class GraphedCall:
    """Calls `fn()` on CUDA by replaying a CUDA graph of it; elsewhere, or when disabled, calls it as it is.

    fn takes no arguments, returns tensors of fixed shapes, reads nothing back to the host, and reads tensors that
    stay put. Its random numbers come from `generators`, registered with the graph, so a replay draws what an eager
    call would. The first call runs fn eagerly on a side stream (the warm-up a capture needs) and captures it;
    later calls replay and return clones. A failed capture is an error, not a fallback: it may leave a
    registered generator in capture mode."""

    def __init__(self, fn, device: torch.device, generators=(), enabled: bool = True):
        self.fn, self.device, self.generators = fn, device, tuple(generators)
        self.enabled = enabled and device.type == "cuda"
        self.graph, self.outputs = None, ()

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
