"""fmchat's own compute kernels. This package never imports ``fmchat``: it depends on torch (and triton on GPU) only."""
