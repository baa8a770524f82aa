"""TVM TensorIR kernels for the sherry, tl2 and i2s formats, their tuning, the build into the op library, and Relax."""
