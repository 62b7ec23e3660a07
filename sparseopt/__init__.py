"""sparseopt: dynamic sparse training with the SparseOpt preconditioner.

Typical use::

    masks = sparseopt.sparsify(model, sparsity=0.9, distribution="erk")
    opt = sparseopt.SparseOpt(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), masks)
    topology = sparseopt.RigL(masks, opt, delta_t=100, alpha=0.3, total_steps=steps)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        topology.step()
        opt.step()
"""

from . import native
from .deploy import export_sparse, load_sparse, sparse_inference
from .masks import (
    DISTRIBUTIONS,
    STRUCTURES,
    MaskedLayer,
    MaskSet,
    Structure,
    active_counts,
    erk_densities,
    fan_in,
    layer_densities,
    neuron_sparsity,
    select_layers,
    sparse_init_,
    sparsify,
)
from .models import MODELS
from .optim import HAM, OptimizerWrapper, SparseOpt, ham_update_, neuron_scales
from .registry import Registry
from .topology import (
    DST_METHODS,
    PRUNE_SCORES,
    SET,
    DSTUpdater,
    RigL,
    Static,
    drop_fraction,
    prune_and_grow,
    zero_state_,
)
from .training_kernels import SparseTraining, sparse_training
from .version import __version__


def sparsity_stats(masks: MaskSet) -> dict[str, float]:
    """Densities, ITOP rates and neuron-sparsity statistics as one flat dict (see ``MaskSet.stats``)."""
    return masks.stats()


__all__ = [
    "DISTRIBUTIONS",
    "DST_METHODS",
    "MODELS",
    "PRUNE_SCORES",
    "Registry",
    "DSTUpdater",
    "HAM",
    "MaskSet",
    "MaskedLayer",
    "OptimizerWrapper",
    "RigL",
    "SET",
    "STRUCTURES",
    "Structure",
    "SparseOpt",
    "Static",
    "active_counts",
    "drop_fraction",
    "erk_densities",
    "export_sparse",
    "load_sparse",
    "native",
    "sparse_inference",
    "sparse_training",
    "SparseTraining",
    "fan_in",
    "ham_update_",
    "layer_densities",
    "neuron_scales",
    "neuron_sparsity",
    "prune_and_grow",
    "select_layers",
    "sparse_init_",
    "sparsify",
    "sparsity_stats",
    "zero_state_",
    "__version__",
]
