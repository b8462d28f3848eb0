"""Package list for setuptools (everything else is in pyproject.toml).

pyproject.toml's ``packages`` is either a find directive or an explicit list, never both, and the two are needed
together: ``fmchat*`` is found as a tree (as before), while the top-level ``kernels/`` folder is mapped, through
``package_dir``, to the import name ``fmchat_kernels``. ``kernels`` is the top-level name of PyPI's ``kernels``
(Hugging Face hub kernels, which transformers imports when it is installed), so this project never installs under
it. ``kernels/`` has no ``__init__.py`` on purpose: a regular package in the current directory would shadow PyPI's
``kernels`` whenever Python runs from the repository root (tests/test_package_names.py).
"""

from setuptools import find_namespace_packages, setup

KERNEL_PACKAGES = ["fmchat_kernels", "fmchat_kernels.attention", "fmchat_kernels.quant"]

setup(
    packages=find_namespace_packages(include=["fmchat", "fmchat.*"]) + KERNEL_PACKAGES,
    package_dir={"fmchat_kernels": "kernels"},
)
