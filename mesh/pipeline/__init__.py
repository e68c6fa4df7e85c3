"""The per-request layers between a listener's codec and the destination cluster."""
