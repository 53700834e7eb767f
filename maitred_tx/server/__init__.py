"""LAYER 2: the Twisted glue around the pure core in maitred_tx.smtp."""
