"""The pipeline's stages: one module per DVC stage, each a thin main() over stages.core."""
