"""Metal kernels, compiled at run time through ``torch.mps.compile_shader``."""
