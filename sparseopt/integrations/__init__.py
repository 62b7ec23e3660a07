"""Sparse training where users already train: Hugging Face's Trainer and Lightning.

Each integration is its own module and imports its framework only when it is imported
(``import sparseopt`` imports neither):

* :mod:`sparseopt.integrations.huggingface`: ``SparseTrainingCallback`` (``pip install 'sparseopt[hf]'``);
* :mod:`sparseopt.integrations.lightning`: ``SparseTraining`` (``pip install 'sparseopt[lightning]'``).

Both are thin layers over :class:`sparseopt.integrations.session.SparseSession`; docs/integrations.md
has a runnable example of each.
"""
