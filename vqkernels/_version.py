__version__ = "0.1.0"
# The oldest torch the compiled kernels load in: they are built on torch's stable ABI
# with TORCH_TARGET_VERSION set to it (setup.py, CMakeLists.txt).
__torch_target__ = "2.10"
