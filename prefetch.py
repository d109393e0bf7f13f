"""Building the next step's batch on a second CUDA stream while the current step trains.

Replayed from a CUDA graph, the augmentation of a 3-way batch still took 3.3 ms of GPU time on an
H200, queued in front of a model step of 12.5 ms on the same stream: the end-to-end step was 10 %
slower than the model step (doc/gpu_runs.md, run 3). Its kernels are about 1300 small ones that
leave most of the GPU idle, so on a stream of their own they can run beside the model step's
kernels instead of before them. This is the usual prefetching of a data loader, done on the
device. Elsewhere the batch is made ahead all the same, on the caller's thread: on the CPU both
would compete for the same cores, and one code path on every device keeps the CPU's tests (a
resumed run equals an uninterrupted one) testing what runs on the GPU.
"""
import torch


class Prefetcher:
    """Calls `make()` one call ahead, on a side stream on CUDA; when disabled, calls it as it is.

    make() takes no arguments and returns a tuple of tensors, drawing its random numbers from `gen`.
    Each call returns the batch launched by the previous call (the first call launches its own) and
    launches the next one, so batches come in the order, and with the values, of plain calls. Meanwhile
    `gen` is one batch ahead: `rewind()` drops the pending batch and sets `gen` back to before it, so
    that a training state saved right after continues as the uninterrupted run would.
    """

    def __init__(self, make, device: torch.device, gen: torch.Generator, enabled: bool = True):
        self.make = make
        self.gen = gen
        self.enabled = enabled
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.pending = None  # (the launched batch, the generator's state before it was drawn)

    def __call__(self):
        if not self.enabled:
            return self.make()
        batch = self.pending[0] if self.pending is not None else self._launch()[0]
        if self.stream is not None:
            current = torch.cuda.current_stream(self.stream.device)
            current.wait_stream(self.stream)  # the step reads the batch only once it is written
            for t in batch:  # made on the side stream: keep its memory until the step is done with it
                t.record_stream(current)
        self.pending = self._launch()
        return batch

    def _launch(self):
        state = self.gen.get_state()
        if self.stream is None:
            return tuple(self.make()), state
        # Whatever the caller's stream wrote before (the image cache, a restored state) is there first.
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            return tuple(self.make()), state

    def rewind(self) -> None:
        """Forget the pending batch and set the generator back to before it (a no-op when nothing is pending)."""
        if self.pending is not None:
            self.gen.set_state(self.pending[1])
            self.pending = None
