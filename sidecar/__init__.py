"""The proxy processes assembled from `mesh`: the sidecar (inbound + outbound + admin) and its entry points."""
