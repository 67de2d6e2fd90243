"""ace: ACE-BERT multimodal e-commerce retrieval as a reproducible MLOps pipeline."""

__version__ = "0.1.0"
