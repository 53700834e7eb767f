"""Inbound message authentication: SPF, DKIM, ARC, DMARC and Authentication-Results.

The checks (spf, dkim, arc, dmarc, authresults) are pure: they take a ``Resolver`` and,
where time matters, a clock as parameters, and import no Twisted.  Only ``dns`` (the
twisted.names resolver) and ``checks`` (the per-message pipeline) touch the reactor.
"""
