"""GraphedCall: the augmentation replayed from a CUDA graph. The CUDA tests run where a GPU is present
(gpu_checks.sh runs this file there); on the CPU the wrapper must be a plain call."""
import pytest
import torch

from common.errors import CutPasteError
from cutpaste import make_batch
from localization.patches import make_patch_batch
from training.cudagraphs import GraphedCall
from training.devices import make_generator

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _images(device, n=6, size=32):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8).to(device)


def _batches(call, count):
    return [call() for _ in range(count)]


def test_graphed_call_is_a_plain_call_on_the_cpu():
    cpu = torch.device("cpu")
    images = _images(cpu)
    gen_a, gen_b = make_generator(cpu, 3), make_generator(cpu, 3)
    graphed = GraphedCall(lambda: make_batch(images, "3way", 4, gen_a), cpu, (gen_a,))
    assert not graphed.enabled
    for (xa, ya), (xb, yb) in zip(_batches(graphed, 3), _batches(lambda: make_batch(images, "3way", 4, gen_b), 3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert graphed.graph is None


@needs_cuda
@pytest.mark.parametrize("variant", ["normal", "3way"])
def test_graph_replays_draw_what_eager_calls_draw(variant):
    cuda = torch.device("cuda")
    images = _images(cuda)
    gen_graph, gen_eager = make_generator(cuda, 5), make_generator(cuda, 5)
    graphed = GraphedCall(lambda: make_batch(images, variant, 4, gen_graph), cuda, (gen_graph,))
    replayed = _batches(graphed, 4)
    eager = _batches(lambda: make_batch(images, variant, 4, gen_eager), 4)
    assert graphed.graph is not None
    for (xg, yg), (xe, ye) in zip(replayed, eager):
        assert torch.equal(xg, xe) and torch.equal(yg, ye)
    # Each call returned its own tensors: later replays did not overwrite the earlier results.
    assert not torch.equal(replayed[1][0], replayed[2][0])
    assert replayed[1][0].data_ptr() != replayed[2][0].data_ptr()


@needs_cuda
def test_graph_of_the_patch_batch_draws_what_eager_calls_draw():
    # Patch-level training (--patch_size) samples crop corners with randint and gathers them by indexing.
    cuda = torch.device("cuda")
    images = _images(cuda)
    gen_graph, gen_eager = make_generator(cuda, 6), make_generator(cuda, 6)
    graphed = GraphedCall(lambda: make_patch_batch(images, "3way", 4, 16, gen_graph), cuda, (gen_graph,))
    replayed = _batches(graphed, 4)
    eager = _batches(lambda: make_patch_batch(images, "3way", 4, 16, gen_eager), 4)
    assert graphed.graph is not None
    for (xg, yg), (xe, ye) in zip(replayed, eager):
        assert torch.equal(xg, xe) and torch.equal(yg, ye)


@needs_cuda
def test_graph_capture_that_fails_names_the_fix():
    cuda = torch.device("cuda")
    values = torch.arange(4.0, device=cuda)

    def reads_back():  # .item() waits for the device, which a capture cannot record
        return (values * values.sum().item(),)

    with pytest.raises(CutPasteError, match="--no-cuda_graph"):
        GraphedCall(reads_back, cuda)()
    assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the stream before the capture is restored"
