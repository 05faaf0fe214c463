"""MSA block-sparse attention: Mojo kernels on MAX, called from PyTorch."""
