"""params `extract` (stage extract; the store CLI): the feature store, views, ONNX Runtime, fingerprints,
data/features files."""
