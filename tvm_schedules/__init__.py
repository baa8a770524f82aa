"""TVM TensorIR kernels for the sherry, tl2 and i2s formats, MetaSchedule tuning, and the build into the op library."""
