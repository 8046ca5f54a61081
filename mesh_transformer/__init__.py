"""mesh-transformer: GPT-J-style language models on JAX device meshes."""

__version__ = "0.1.0"
