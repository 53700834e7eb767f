"""MTA-STS (RFC 8461) for senders: which MX hosts of a domain may be used, and whether
their TLS must verify.

Pure parts: ``policy`` (TXT record and policy grammar, MX matching), ``enforce``
(per-MX decisions), ``report`` (RFC 8460 TLS-RPT counters and report), ``tlsrpt``
(the RFC 8460 ``_smtp._tls`` record and the report as mailed or POSTed), ``cache``
(the on-disk cache).  Glue: ``fetch`` (HTTPS with treq) and ``store`` (discovery and
caching, RFC 8461 5.1); sending the reports is ``maitred_tx.relay.reports``::

    store = PolicyStore(reactor, TwistedResolver(reactor), PolicyFetcher(reactor),
                        cache_dir="/var/lib/maitred/mta-sts")
    policy = await store.policy_for("example.com")
    allowed, refused = filter_mx(policy, mx_records)
"""

from maitred_tx.mta_sts.cache import CachedPolicy, PolicyCache
from maitred_tx.mta_sts.enforce import MxVerdict, check_mx, filter_mx
from maitred_tx.mta_sts.fetch import FetchError, PolicyFetcher
from maitred_tx.mta_sts.policy import (
    Mode,
    NoStsRecord,
    Policy,
    StsError,
    StsRecord,
    parse_policy,
    parse_txt_record,
    select_record,
)
from maitred_tx.mta_sts.report import FailureDetail, ResultType, TlsReport
from maitred_tx.mta_sts.store import PolicyStore

__all__ = [
    "CachedPolicy",
    "FailureDetail",
    "FetchError",
    "Mode",
    "MxVerdict",
    "NoStsRecord",
    "Policy",
    "PolicyCache",
    "PolicyFetcher",
    "PolicyStore",
    "ResultType",
    "StsError",
    "StsRecord",
    "TlsReport",
    "check_mx",
    "filter_mx",
    "parse_policy",
    "parse_txt_record",
    "select_record",
]
