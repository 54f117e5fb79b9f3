"""The library behind the stages: params, images, backbones, ONNX export, feature store, heads."""
