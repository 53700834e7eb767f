"""The ``twistd maitred`` options of the outbound queue (``--delivery queue``,
``--relay-*``, ``--spool``): the smarthost they describe, the queue delivery and the
runner that empties it.  Apart from ``tap``, whose ``Options`` passes itself in, so
that the command line's own module stays about the server."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from twisted.python import usage

if TYPE_CHECKING:
    from maitred_tx.relay.route import RelayHost

__all__ = ["check_tls_reports", "queue_delivery", "queue_runner", "relay_host"]


def relay_host(options: Any) -> RelayHost | None:
    """The RelayHost of --relay-host, as --relay-tls and --relay-auth say (None
    without --relay-host); a usage.UsageError saying what is wrong.  The password file
    is read now, at startup, by the process that runs the queue (a --workers worker
    does not: it only queues)."""
    given = [f"--{o}" for o in ("relay-tls", "relay-auth", "relay-trust-root")
             if options[o] is not None]
    if options["relay-host"] is None:
        if given:
            raise usage.UsageError(f"{given[0]} needs --relay-host")
        return None
    from maitred_tx.relay.route import parse_relay_host
    from maitred_tx.relay.smarthost import RelayTLS, read_credentials

    try:
        relay = parse_relay_host(options["relay-host"])
    except ValueError as e:
        raise usage.UsageError(f"--relay-host: {e}") from None
    credentials = None
    if options["relay-auth"] is not None and options["inherited-fds"] is None:
        try:
            credentials = read_credentials(options["relay-auth"])
        except ValueError as e:
            raise usage.UsageError(f"--relay-auth: {e}") from None
    try:
        tls = RelayTLS(options["relay-tls"]
                       or ("verify" if options["relay-auth"] else "opportunistic"))
    except ValueError:
        raise usage.UsageError("--relay-tls must be opportunistic, verify or "
                               "implicit") from None
    if tls is RelayTLS.OPPORTUNISTIC and (options["relay-auth"] or options["relay-trust-root"]):
        option = "--relay-auth" if options["relay-auth"] else "--relay-trust-root"
        raise usage.UsageError(
            f"{option} needs --relay-tls verify or implicit: opportunistic TLS "
            "verifies nothing, and a password must not go to an unverified server "
            "or in the clear")
    if options["relay-trust-root"] is not None:
        options["relay-trust-root"] = os.path.abspath(options["relay-trust-root"])
        from OpenSSL.crypto import Error as OpenSSLError

        from maitred_tx.client.api import tls_options

        try:  # what each connection will do, done once now: errors show at startup
            tls_options(relay.name, trust_root=options["relay-trust-root"])
        except (OSError, ValueError, OpenSSLError) as e:
            raise usage.UsageError(f"--relay-trust-root: {e}") from None
    return replace(relay, tls=tls, credentials=credentials)


def check_tls_reports(options: Any) -> None:
    """--tls-reports and --tls-reports-contact make sense together, with our own
    MTA-STS sending (--delivery queue, no --relay-host, no --no-mta-sts: only then are
    there sessions to report); else a usage.UsageError saying what is wrong."""
    organization, contact = options["tls-reports"], options["tls-reports-contact"]
    if organization is None:
        if contact is not None:
            raise usage.UsageError("--tls-reports-contact needs --tls-reports")
        return
    if not organization.strip():
        raise usage.UsageError("--tls-reports: the organization name is empty")
    if contact is None:
        raise usage.UsageError("--tls-reports needs --tls-reports-contact ADDRESS")
    if options["delivery"] != "queue":
        raise usage.UsageError("--tls-reports needs --delivery queue")
    if options["relay-host"] is not None:
        raise usage.UsageError("--tls-reports is meaningless with --relay-host: the "
                               "smarthost, not maitred, sends to the MX hosts")
    if options["no-mta-sts"]:
        raise usage.UsageError("--tls-reports is meaningless with --no-mta-sts: "
                               "the reports count MTA-STS sessions")
    from maitred_tx.mta_sts.policy import StsError, ascii_domain

    local, at, domain = contact.rpartition("@")
    if not at or not local or any(c.isspace() or c in '<>"' for c in contact):
        raise usage.UsageError(f"--tls-reports-contact: {contact!r} is not an address "
                               "(local@domain)")
    try:
        ascii_domain(domain)
    except StsError as e:
        raise usage.UsageError(f"--tls-reports-contact: {e}") from None


def queue_delivery(options: Any, reactor: Any) -> Any:
    """The outbound queue in --spool.  The process that owns the spool recovers it
    (cleans up after a crash, takes its lock); a --workers worker only adds to it."""
    from maitred_tx.delivery.queue import QueueDelivery
    from maitred_tx.queue.spool import SpoolLocked, SpoolStore
    from maitred_tx.queue.threaded import ThreadedQueue, log_recovery

    store = SpoolStore(os.path.abspath(options["spool"]))
    if options.get("inherited-fds") is None:
        try:
            log_recovery(store.root, store.recover())
        except SpoolLocked as e:
            raise usage.UsageError(f"--spool: {e}") from None
    else:
        store.prepare()
    delivery = QueueDelivery(ThreadedQueue(store, reactor))
    if options.get("inherited-fds") is not None:  # the supervisor runs the queue
        delivery.subscribe(lambda message: store.notify_new())
    return delivery


def queue_runner(options: Any, reactor: Any, queue: Any, metrics: Any = None) -> Any:
    """The queue runner of --delivery queue: MX hosts (with MTA-STS) or --relay-host,
    DKIM signing with --dkim-key, retries for --queue-lifetime."""
    from twisted.python.threadpool import ThreadPool

    from maitred_tx.auth.dns import TwistedResolver
    from maitred_tx.mta_sts import PolicyStore
    from maitred_tx.queue.schedule import RetryPolicy
    from maitred_tx.queue.threaded import ThreadedQueue
    from maitred_tx.relay.runner import QueueRunner
    from maitred_tx.relay.sender import OutboundSender

    hostname = options.config.hostname
    resolver = TwistedResolver(reactor, options["dns-server"] or None, options["dns-timeout"])
    relay = options["relay-host"]
    mta_sts = None
    if relay is None and not options["no-mta-sts"]:
        cache = os.path.join(os.path.abspath(options["spool"]), "mta-sts")
        mta_sts = PolicyStore(reactor, resolver, cache_dir=cache)
    sender = OutboundSender(reactor, resolver, helo=hostname, relay=relay, mta_sts=mta_sts,
                            signer=options.dkim_signer, trust_root=options["relay-trust-root"])
    pool = ThreadPool(minthreads=1, maxthreads=2, name="maitred-queue")
    runner_queue = ThreadedQueue(queue.store, reactor, pool)
    companions = []
    if mta_sts is not None and options.get("tls-reports") is not None:
        from maitred_tx.relay.reports import TlsReportSender

        async def submit(envelope: Any, data: bytes) -> str:
            queued = await runner_queue.add(envelope, [data])
            runner.kick()
            return queued

        from maitred_tx.mta_sts.cache import REPORT_STATE_FILE

        companions.append(TlsReportSender(
            reactor, mta_sts.report, resolver, submit,
            organization=options["tls-reports"], contact=options["tls-reports-contact"],
            state_path=os.path.join(cache, REPORT_STATE_FILE)))
    runner = QueueRunner(reactor, runner_queue, sender,
                         hostname=hostname, metrics=metrics, threadpool=pool,
                         destination_concurrency=options["destination-concurrency"],
                         policy=RetryPolicy(give_up_after=options["queue-lifetime"]),
                         refresh=None if mta_sts is None else mta_sts.refresh_cached,
                         companions=companions)
    return runner
