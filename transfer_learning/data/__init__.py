"""params `data` (stage prepare): image sources, decoding, the manifest of data/prepared."""
