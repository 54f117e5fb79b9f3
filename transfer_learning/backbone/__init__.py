"""params `backbone` and `export` (stages download, export): torchvision weights, the backbone's anatomy,
models/backbone files, ONNX export."""
