"""Model definitions: shared layers, the transformer, and one module per architecture."""
