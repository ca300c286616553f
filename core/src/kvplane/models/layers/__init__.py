"""Model building blocks that reach ops, attention and quantization only through the
resolved :class:`~kvplane.plugins.platform.Platform`, so every platform and every
quantization method applies to every architecture."""
