"""predict and --deploy (not a stage): models on new images, one standalone ONNX file per head."""
