"""torch.compile of a masked model trained with DST: compiled once, never again on ordinary steps or at mask updates.

Dynamo's guards are what recompiles; the backend does not matter for them, so the test uses the
``eager`` backend (no code generation, seconds). Masks are buffers the forward does not read (the
weights hold their zeros), and a topology update edits weights and masks in place: nothing a guard sees.
"""

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sparseopt
from sparseopt.models import build_model


def test_masked_dst_training_under_torch_compile_never_recompiles():
    torch._dynamo.reset()
    counters.clear()  # counted from this test on
    torch.manual_seed(0)
    model = build_model("resnet20", 10, in_shape=(3, 16, 16))
    masks = sparseopt.sparsify(model, 0.9)
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), masks)
    topology = sparseopt.RigL(masks, opt, delta_t=3, total_steps=20)
    compiled = torch.compile(model, backend="eager")
    g = torch.Generator().manual_seed(1)
    graphs, updates = [], 0
    for _ in range(10):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        updates += topology.step()
        opt.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert updates == 3  # t = 3, 6, 9
    # the first forward compiles once more after SparseOpt's one-off hooks (which layers feed a norm) are removed
    assert graphs[1] <= graphs[0] + 1 and graphs[-1] == graphs[1], graphs
    for layer in masks:
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0  # still masked
    torch._dynamo.reset()
