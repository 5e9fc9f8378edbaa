"""mira: adapting large language models to private data that never leaves its owner."""

__version__ = "0.1.0"
