"""SDSAT models: SAT vocabulary, training layout and loss, trainer, and the decoding engine.

Pure torch + transformers. Nothing here imports Ray, Redis or HTTP code (a test enforces it).
"""
