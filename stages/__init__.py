"""The pipeline's stages: one module per DVC stage (and the predict and store CLIs), each a thin main() that reads its
own params section and calls transfer_learning; never imported by other code."""
