"""Weight conversion: Hugging Face import/export and the original mesh-transformer-jax checkpoints."""
