"""The image file extensions the pipeline reads, in a module of its own: prepare and predict list folders with it
without importing the decoding code (images.py), which imports torch."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
