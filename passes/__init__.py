"""The catalogue: papers' math as plain PyTorch, registered as passes through the ``softswap.passes`` entry point
(:func:`passes.register.register`)."""
