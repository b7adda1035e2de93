"""ftx: fine-tune -> merge -> quantize -> serve -> bench, from one recipe."""

__version__ = "0.1.0"
