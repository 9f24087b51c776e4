"""Training data: corpora, fixed-length windows, fill-in-the-middle, the SDSAT layout and the
self-distilled labels of the adapter."""
