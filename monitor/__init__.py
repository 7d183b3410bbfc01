"""Safety monitor: reads an LLM's residual stream, decomposes it into SAE features, watches them."""

__version__ = "0.1.0"
