"""Deployment of trained sparse networks: compact files and sparse CPU inference."""

from .export import export_sparse, load_sparse, read_sparse
from .inference import fold_batchnorm, sparse_inference

__all__ = ["export_sparse", "fold_batchnorm", "load_sparse", "read_sparse", "sparse_inference"]
