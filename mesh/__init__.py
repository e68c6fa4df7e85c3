"""triomesh core library: listeners, codecs, routing, clusters and policies shared by every proxy role."""

__version__ = "0.1.0"
