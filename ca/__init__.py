"""The mesh certificate authority: root keys, SPIFFE leaf signing, trust bundles, bootstrap tokens, `mesh ca`."""
