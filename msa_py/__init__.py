"""MSA block-sparse attention: Mojo kernels on MAX, called from PyTorch.

The torch functions (select_blocks, invert, block_attention, combine,
forced_combine, sparse_attention, msa_attention, quantize_index and
quantize_rows for the FP8 indexer; for training sparse_attention_backward, block_mass,
index_block_scores, indexer_kl_loss; for serving the paged_* ops,
quantize_cache and PagedDecodePlan) live here; `msa_py.reference` is the NumPy
float64 truth and `msa_py.graph` the MAX-graph layer, with the same names.
torch is imported on first use, so the reference works without it.
"""

__version__ = "0.1.0"

_TORCH_API = ("select_blocks", "invert", "block_attention", "combine", "forced_combine", "sparse_attention",
              "msa_attention", "sparse_attention_backward", "block_mass", "index_block_scores", "indexer_kl_loss",
              "paged_msa_attention", "paged_select_blocks", "paged_sparse_attention", "paged_append", "quantize_cache",
              "quantize_index", "quantize_rows")
__all__ = list(_TORCH_API) + ["PagedDecodePlan"]


_MODULE_OF = {"block_mass": "training", "index_block_scores": "training", "indexer_kl_loss": "training",
              "paged_msa_attention": "paged", "paged_select_blocks": "paged", "paged_sparse_attention": "paged",
              "paged_append": "paged", "quantize_cache": "paged", "PagedDecodePlan": "plan"}


def __getattr__(name):
    if name in _TORCH_API or name in _MODULE_OF:
        import importlib

        return getattr(importlib.import_module(f".{_MODULE_OF.get(name, 'torch_ops')}", __name__), name)
    raise AttributeError(f"module 'msa_py' has no attribute {name!r}")
