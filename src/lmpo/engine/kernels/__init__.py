"""Small native kernels for the hot paths that the math libraries at hand serve badly (built on first use)."""
