"""maitred_tx.relay: sending queued mail onward (issue 15): where it goes (``route``)
and how it is sent (MX hosts, MTA-STS, the client)."""
