"""What the mesh lets operators see: trace context, spans and their export (metrics and logs live beside)."""
