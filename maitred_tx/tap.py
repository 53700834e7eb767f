"""`twistd maitred`: command-line options and makeService.  The dropin in
twisted/plugins/ only names this module, so plugin scans stay cheap."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from functools import partial
from ipaddress import ip_network
from typing import Any, ClassVar

from twisted.cred import strcred
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.logger import ILogObserver, Logger
from twisted.python import reflect, usage
from twisted.python.components import Componentized
from zope.interface import implementer

from maitred_tx.metrics import (
    MULTIPROC_ENV,
    default_metrics,
    metrics_resource,
    metrics_service,
    prepare_multiproc_dir,
    worker_exited,
)
from maitred_tx.relay.options import (
    check_tls_reports,
    queue_delivery,
    queue_runner,
    relay_host,
)
from maitred_tx.server.tls import server_context
from maitred_tx.service import DEFAULT_DNS_TIMEOUT, DEFAULT_LISTEN, SMTPService
from maitred_tx.smtp.config import (
    AuthChecks,
    AuthTempError,
    BareLineEndings,
    Config,
    Limits,
    Mode,
)
from maitred_tx.textlog import twistd_observer
from maitred_tx.workers import WorkerPool, become_worker, worker_command, worker_limits

__all__ = ["Options", "makeService"]

_log = Logger()
_DEFAULTS = Limits()
_AUTH = AuthChecks()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not a positive integer")
    return number


def _natural(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive number of seconds")
    return number


class Options(usage.Options, strcred.AuthOptionMixin):
    synopsis = "[options]"
    longdesc = (
        "Receive mail over ESMTP into a Maildir (or your own delivery).  Listens on "
        "127.0.0.1:2525 and accepts mail for 'localhost' unless told otherwise; it is "
        "never an open relay unless --relay is given."
    )
    supportedInterfaces = (IUsernamePassword,)
    optFlags: ClassVar[list[list[Any]]] = [
        ["relay", None, "DANGEROUS: accept mail for every domain (an open relay "
                        "unless the listener is protected otherwise)."],
        ["require-tls", None, "Refuse MAIL until the session uses TLS (530 5.7.0)."],
        ["proxy-protocol", None, "Connections from --trusted-proxy networks start with a "
                                 "PROXY v1/v2 header (HAProxy send-proxy[-v2]); without "
                                 "one they are closed."],
        ["insecure-auth", None, "DANGEROUS: offer AUTH on cleartext sessions "
                                "(passwords readable on the wire)."],
        ["no-auth-checks", None, "Do not check SPF, DKIM, ARC and DMARC (no "
                                 "Authentication-Results field is added)."],
        ["lmtp-auth-checks", None, "Check SPF, DKIM, ARC and DMARC on the --lmtp "
                                   "listeners too (off by default: the MTA in front "
                                   "has checked)."],
        ["no-mta-sts", None, "--delivery queue: do not apply MTA-STS (RFC 8461) policies "
                             "when sending to MX hosts."],
        ["dmarc-reject", None, "Refuse messages that fail DMARC when the author domain "
                               "publishes p=reject (550 5.7.1 after the body)."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["hostname", None, None, "Name used in the greeting, EHLO and Received: "
                                 "(default: this machine's name).", str],
        ["maildir", None, "./maildir", "Root of the Maildir tree for --delivery "
                                       "maildir: ROOT/<domain>/<local part>/."],
        ["spool", None, "./spool", "Spool directory of --delivery queue (the outbound "
                                   "queue; see maitred-queue)."],
        ["delivery", None, "maildir", "Where mail goes: 'maildir', 'queue' (the outbound "
                                      "queue in --spool, for relaying), 'discard' (accepts "
                                      "and drops, for load tests), "
                                      "'python:package.module.name' (an IDelivery, a "
                                      "twisted.mail IMessageDelivery(Factory), or a "
                                      "zero-argument factory of one), an http:// or "
                                      "https:// URL (a webhook: each message is POSTed), "
                                      "or lmtp:ENDPOINT (forwarded to an LMTP server such "
                                      "as Dovecot: lmtp:unix:/run/dovecot/lmtp, "
                                      "lmtp:tcp:127.0.0.1:24)."],
        ["webhook-timeout", None, 30.0, "Seconds for one webhook POST (connect, upload, "
                                        "answer); past it the sender gets 451.", _seconds],
        ["dkim-sign-all", None, None, "A --dkim-key domain whose keys sign outgoing "
                                      "messages whose From: domain has no key."],
        ["max-size", None, _DEFAULTS.max_message_size, "Largest message in octets "
                                                       "(advertised as SIZE).", _positive_int],
        ["max-recipients", None, _DEFAULTS.max_recipients, "Recipients per transaction "
                                                           "(at least 100).", _positive_int],
        ["max-line", None, _DEFAULTS.max_text_line, "Longest message text line in octets, "
                                                    "CRLF included (at least 1000).",
         _positive_int],
        ["max-command-line", None, _DEFAULTS.max_command_line, "Longest command line in "
                                                               "octets (at least 512).",
         _positive_int],
        ["max-header", None, _DEFAULTS.max_header_block, "Largest header block in octets.",
         _positive_int],
        ["max-hops", None, _DEFAULTS.max_hops, "Most Received: header fields a message may "
                                               "arrive with, against mail loops (554 5.4.6; "
                                               "0: no limit).", _natural],
        ["max-errors", None, _DEFAULTS.max_errors, "Errors per session before 421 and "
                                                   "close.", _positive_int],
        ["command-timeout", None, _DEFAULTS.command_timeout, "Seconds to wait for a "
                                                             "command.", _seconds],
        ["data-timeout", None, _DEFAULTS.data_timeout, "Seconds to wait for more message "
                                                       "data.", _seconds],
        ["session-deadline", None, _DEFAULTS.session_deadline, "Longest session in "
                                                               "seconds.", _seconds],
        ["tls-cert", None, None, "PEM certificate (with chain) for STARTTLS on the TCP "
                                 "listeners and for ssl: endpoints."],
        ["tls-key", None, None, "PEM private key for --tls-cert (default: in that file)."],
        ["max-auth-failures", None, _DEFAULTS.max_auth_failures, "Failed AUTH attempts "
                                                                 "before 421 and close.",
         _positive_int],
        ["max-client-connections", None, _DEFAULTS.max_client_connections,
         "Simultaneous sessions per client address (0: no limit).", _natural],
        ["max-client-connection-rate", None, _DEFAULTS.max_client_connection_rate,
         "New sessions per client address per minute (0: no limit).", _natural],
        ["max-client-message-rate", None, _DEFAULTS.max_client_message_rate,
         "Messages per client address per minute (0: no limit).", _natural],
        ["auth-temperror", None, "accept", "A temporary DNS failure that could change "
                                           "the authentication verdict: 'accept' "
                                           "(deliver, recorded as temperror) or 'defer' "
                                           "(451 4.7.0, the sender retries)."],
        ["dns-timeout", None, DEFAULT_DNS_TIMEOUT, "Seconds for one DNS lookup of the "
                                                   "authentication checks.", _seconds],
        ["max-dkim-size", None, _AUTH.max_dkim_size, "Largest message whose DKIM and ARC "
                                                     "signatures are verified, in octets "
                                                     "(larger: dkim=policy).", _natural],
        ["relay-host", None, None, "--delivery queue: send everything to this smarthost, "
                                   "HOST[:PORT] (its MX) or [HOST][:PORT] (no MX lookup), "
                                   "instead of each domain's MX hosts."],
        ["relay-tls", None, None, "--relay-host: 'opportunistic' (STARTTLS when offered, "
                                  "certificate not checked; the default without "
                                  "--relay-auth), 'verify' (STARTTLS required, certificate "
                                  "verified for the host's name; the default with "
                                  "--relay-auth) or 'implicit' (TLS from the first byte, "
                                  "port 465, verified)."],
        ["relay-auth", None, None, "--relay-host: a file holding USER:PASSWORD on one line "
                                   "(mode 600), to AUTH to the smarthost with; needs "
                                   "--relay-tls verify or implicit."],
        ["relay-trust-root", None, None, "--relay-host: PEM file of the CA certificates "
                                         "to verify the smarthost against (default: the "
                                         "system's)."],
        ["queue-lifetime", None, 5 * 86400.0, "--delivery queue: seconds a message is "
                                              "retried before it bounces.", _seconds],
        ["destination-concurrency", None, 1, "--delivery queue: connections at once to "
                                             "one destination (a domain, or the "
                                             "--relay-host).", _positive_int],
        ["tls-reports", None, None, "--delivery queue: send daily RFC 8460 TLS reports "
                                    "(MTA-STS session counts) to the domains that ask "
                                    "for them (_smtp._tls TXT), as this organization "
                                    "name; needs --tls-reports-contact (default: none "
                                    "are sent)."],
        ["tls-reports-contact", None, None, "--tls-reports: our address in the reports "
                                            "(contact-info), their From: and envelope "
                                            "sender; bounces come back to it, and its "
                                            "domain is the report submitter."],
        ["workers", None, 0, "Serve from this many worker processes (0: serve in this "
                             "process).  This process binds the listeners, starts the "
                             "workers and restarts any that dies; per-client limits are "
                             "shared out among them.", _natural],
        ["inherited-fds", None, None, "Internal: the listening sockets a worker of "
                                      "--workers inherits, in listener order."],
        ["metrics", None, None, "Twisted server endpoint string for a Prometheus "
                                "/metrics endpoint, e.g. tcp:9025:interface=127.0.0.1 "
                                "(default: none).  Keep it on loopback or a private "
                                "network: it tells how much mail flows."],
        ["bare-line-endings", None, "reject", "A bare CR or LF inside a message: "
                                              "'reject' (550 5.6.0) or 'accept' (store "
                                              "as sent).  Neither ever ends DATA."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["submission"] = []
        self["lmtp"] = []
        self["domain"] = []
        self["trusted-proxy"] = []
        self["dns-server"] = []
        self["dkim-key"] = []
        self.dkim_signer: Any = None  # a maitred_tx.auth.sign.Signer with --dkim-key

    def opt_listen(self, description: str) -> None:
        """Twisted server endpoint string for an MX listener (repeatable; default
        tcp:2525:interface=127.0.0.1 when no listener is given)."""
        self["listen"].append(description)

    def opt_submission(self, description: str) -> None:
        """Endpoint string for a submission listener (587/465 style: AUTH first, any
        recipient domain; repeatable)."""
        self["submission"].append(description)

    def opt_lmtp(self, description: str) -> None:
        """Endpoint string for an LMTP listener (RFC 2033; tcp: or unix:; repeatable)."""
        self["lmtp"].append(description)

    def opt_trusted_proxy(self, network: str) -> None:
        """Network (CIDR) allowed to send PROXY protocol v1/v2 headers and XCLIENT
        (repeatable)."""
        try:
            ip_network(network, strict=False)
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxy: {e}") from None
        self["trusted-proxy"].append(network)

    def opt_dns_server(self, server: str) -> None:
        """Resolver for the authentication checks, HOST[:PORT] ([IPv6]:PORT; repeatable;
        default: the nameservers of /etc/resolv.conf)."""
        from maitred_tx.auth.dns import parse_dns_server

        try:
            self["dns-server"].append(parse_dns_server(server))
        except ValueError as e:
            raise usage.UsageError(f"--dns-server: {e}") from None

    def opt_dkim_key(self, value: str) -> None:
        """SELECTOR:DOMAIN:KEYFILE, a key that DKIM-signs outgoing mail (PEM RSA or
        Ed25519, or dkimpy's Ed25519 seed file; repeatable: an RSA and an Ed25519 key
        for one domain sign each message twice)."""
        from maitred_tx.auth.sign import DKIMKeyError, parse_dkim_key_option

        try:
            key = parse_dkim_key_option(value)
        except DKIMKeyError as e:
            raise usage.UsageError(f"--dkim-key: {e}") from None
        for warning in key.warnings:
            _log.warn("--dkim-key: {warning}", warning=warning)
        self["dkim-key"].append(key)

    def opt_domain(self, domain: str) -> None:
        """A domain to accept mail for (repeatable; default: localhost)."""
        self["domain"].append(domain)

    def postOptions(self) -> None:
        if self["auth-temperror"] not in ("accept", "defer"):
            raise usage.UsageError("--auth-temperror must be 'accept' or 'defer'")
        if self["bare-line-endings"] not in ("reject", "accept"):
            raise usage.UsageError("--bare-line-endings must be 'reject' or 'accept'")
        delivery = self["delivery"]
        if delivery not in ("maildir", "queue", "discard") and not delivery.startswith(
                ("python:", "http://", "https://", "lmtp:")):
            raise usage.UsageError("--delivery must be maildir, queue, discard, python:NAME "
                                   "or an http(s):// URL, or lmtp:ENDPOINT")
        self.dkim_signer = self.make_dkim_signer()
        try:
            self.config = self.make_config()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["workers"] and not self["tls-cert"] and any(
                d.startswith("ssl:") for d in self.listener_descriptions()):
            raise usage.UsageError("with --workers, ssl: listeners need --tls-cert "
                                   "(the workers make the TLS context)")
        if self["inherited-fds"] is not None:
            try:
                self["inherited-fds"] = [int(f) for f in self["inherited-fds"].split(",")]
            except ValueError:
                raise usage.UsageError("--inherited-fds: comma-separated numbers") from None
            if len(self["inherited-fds"]) != len(self.listener_descriptions()):
                raise usage.UsageError("--inherited-fds: one per listener")
        self["relay-host"] = relay_host(self)
        check_tls_reports(self)

    def listener_descriptions(self) -> list[str]:
        """Every listener's endpoint description, in the order listeners are made."""
        return (self["listen"] + self["submission"] + self["lmtp"]) or [DEFAULT_LISTEN]

    def make_dkim_signer(self) -> Any:
        """The Signer of the --dkim-key options, or None.  Its ``sign`` needs a runner:
        ``signer.with_runner(partial(deferToThreadPool, reactor, pool))``."""
        if not self["dkim-key"]:
            if self["dkim-sign-all"]:
                raise usage.UsageError("--dkim-sign-all needs --dkim-key")
            return None
        from maitred_tx.auth.sign import DKIMKeyError, Signer

        try:
            return Signer(self["dkim-key"], sign_all=self["dkim-sign-all"])
        except DKIMKeyError as e:
            raise usage.UsageError(f"--dkim-key: {e}") from None

    def make_config(self) -> Config:
        import socket

        limits = Limits(
            max_command_line=self["max-command-line"],
            max_text_line=self["max-line"],
            max_header_block=self["max-header"],
            max_hops=self["max-hops"],
            max_recipients=self["max-recipients"],
            max_message_size=self["max-size"],
            max_errors=self["max-errors"],
            max_auth_failures=self["max-auth-failures"],
            max_client_connections=self["max-client-connections"],
            max_client_connection_rate=self["max-client-connection-rate"],
            max_client_message_rate=self["max-client-message-rate"],
            command_timeout=self["command-timeout"],
            data_timeout=self["data-timeout"],
            session_deadline=self["session-deadline"],
        )
        if self["workers"]:
            limits = worker_limits(limits, self["workers"])
        return Config(
            hostname=self["hostname"] or socket.getfqdn(),
            local_domains=frozenset(self["domain"] or ["localhost"]),
            limits=limits,
            bare_line_endings=BareLineEndings(self["bare-line-endings"]),
            relay=bool(self["relay"]),
            require_tls=bool(self["require-tls"]),
            insecure_auth=bool(self["insecure-auth"]),
            proxy_protocol=bool(self["proxy-protocol"]),
            auth_checks=AuthChecks(
                enabled=False if self["no-auth-checks"] else None,
                temperror=AuthTempError(self["auth-temperror"]),
                dmarc_reject=bool(self["dmarc-reject"]),
                max_dkim_size=self["max-dkim-size"],
            ),
        )


def load_delivery(options: Options, reactor: Any) -> Any:
    """The delivery object named by --delivery."""
    name = options["delivery"]
    if name == "discard":
        from maitred_tx.delivery.discard import DiscardDelivery

        return DiscardDelivery()
    if name == "maildir":
        from maitred_tx.delivery.maildir import MaildirDelivery

        root = os.path.abspath(options["maildir"])
        postmaster = (options["domain"] or ["localhost"])[0]
        return MaildirDelivery(root, reactor, postmaster_domain=postmaster)
    if name == "queue":
        return queue_delivery(options, reactor)
    if name.startswith(("http://", "https://")):
        from maitred_tx.delivery.http import HTTPDelivery

        return HTTPDelivery(reactor, name, timeout=options["webhook-timeout"])
    if name.startswith("lmtp:"):
        from maitred_tx.delivery.lmtp import LMTPDelivery

        try:
            return LMTPDelivery(reactor, name[len("lmtp:") :], lhlo=options.config.hostname)
        except ValueError as e:
            raise usage.UsageError(f"--delivery {name}: {e}") from None
    obj = reflect.namedAny(name[len("python:") :])
    from maitred_tx.delivery.compat import delivery_provider

    try:
        delivery_provider(obj)
    except TypeError:
        obj = obj()  # a zero-argument factory, as `twistd web --wsgi` takes
        delivery_provider(obj)
    return obj


def makeService(options: Options) -> Any:
    from twisted.internet import reactor  # only here: twistd's own entry point

    if options["workers"] and options["inherited-fds"] is None:
        return _supervisor(options, reactor)
    config = options.config
    delivery = load_delivery(options, reactor)
    if config.relay:
        _log.warn("--relay is set: mail for every domain is accepted (open relay)")
    if config.insecure_auth:
        _log.warn("--insecure-auth is set: passwords may cross the network in the clear")
    portal = None
    if options.get("credCheckers"):
        checkers = [_bytes_users(c) for c in options["credCheckers"]]
        portal = Portal(DeliveryRealm(delivery), checkers)
    tls = server_context(options["tls-cert"], options["tls-key"]) if options["tls-cert"] else None
    listeners = [(d, config) for d in options["listen"]]
    listeners += [(d, replace(config, mode=Mode.SUBMISSION)) for d in options["submission"]]
    lmtp = replace(config, mode=Mode.LMTP)
    if options["lmtp-auth-checks"] and not options["no-auth-checks"]:
        lmtp = replace(lmtp, auth_checks=replace(config.auth_checks, enabled=True))
    listeners += [(d, lmtp) for d in options["lmtp"]]
    if not listeners:
        listeners = [(DEFAULT_LISTEN, config)]
    assert [d for d, _ in listeners] == options.listener_descriptions()
    service = _TwistdService(
        reactor, config, delivery, (), portal=portal, tls=tls,
        trusted_proxies=options["trusted-proxy"],
        dns_servers=options["dns-server"] or None, dns_timeout=options["dns-timeout"],
        metrics=default_metrics() if options["metrics"] else None,
    )
    inherited = options["inherited-fds"]
    if inherited is not None:
        become_worker(reactor)
    for i, (description, listener_config) in enumerate(listeners):
        if inherited is None:
            service.listen(description, listener_config)
        else:  # a worker of --workers: accept on the supervisor's sockets
            service.adopt(inherited[i], description, listener_config)
    if options["metrics"] and inherited is None:  # a worker counts; its supervisor serves
        metrics_service(reactor, options["metrics"]).setServiceParent(service)
    if options["delivery"] == "queue" and inherited is None:
        runner = queue_runner(options, reactor, delivery.queue,
                               default_metrics() if options["metrics"] else None)
        delivery.subscribe(runner.notify)
        runner.setServiceParent(service)
    service.text_log = twistd_observer(getattr(options, "parent", None))
    return service


def _supervisor(options: Options, reactor: Any) -> Any:
    """``--workers N``: this process binds, supervises and logs; workers serve."""
    twistd = getattr(options, "parent", None) or {}
    worker_twistd: list[str] = []
    if twistd.get("syslog"):
        worker_twistd += ["--syslog", f"--prefix={twistd.get('prefix') or 'twisted'}"]
    elif twistd.get("logger"):
        factory = twistd["logger"]  # twistd keeps the object: name it again
        worker_twistd += [f"--logger={factory.__module__}.{factory.__qualname__}"]
    maitred_args = _own_arguments()
    text_log = twistd_observer(twistd or None)
    env, on_exit, multiproc_dir = dict(os.environ), None, None
    if options["metrics"]:
        # The workers count into files here (prometheus_client's multiprocess mode);
        # this process serves their sum.
        multiproc_dir = _metrics_dir(twistd)
        # Gone with the process: after shutdown the workers are stopped, and the next
        # start counts from zero anyway (prometheus_client's multiprocess contract).
        reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, multiproc_dir,
                                      ignore_errors=True)
        env[MULTIPROC_ENV] = multiproc_dir
        # This process counts too (the queue it runs), into the same directory: set
        # before prometheus_client is first imported here (metrics_resource, below).
        os.environ[MULTIPROC_ENV] = multiproc_dir
        on_exit = partial(worker_exited, multiproc_dir=multiproc_dir)
    pool = _TwistdPool(
        reactor, options.listener_descriptions(), options["workers"],
        lambda fds: worker_command(worker_twistd, maitred_args, fds),
        log_file=getattr(text_log, "_outFile", None) if not worker_twistd else None,
        implicit_tls=bool(options["tls-cert"]), env=env, on_exit=on_exit,
    )
    if multiproc_dir is not None:
        metrics_service(reactor, options["metrics"],
                        metrics_resource(reactor, multiproc_dir=multiproc_dir)
                        ).setServiceParent(pool)
    if options["delivery"] == "queue":
        # The supervisor owns the spool: it recovers it and runs its queue; the
        # workers add messages and tell it (SpoolStore.notify_new).
        delivery = queue_delivery(options, reactor)
        metrics = default_metrics() if multiproc_dir is not None else None
        queue_runner(options, reactor, delivery.queue, metrics).setServiceParent(pool)
    pool.text_log = text_log
    return pool


def _metrics_dir(twistd: Any) -> str:
    """A fresh directory for the workers' metric files, theirs to write: twistd's
    --uid/--gid take effect after this, and the workers run as those."""
    import tempfile

    path = tempfile.mkdtemp(prefix="maitred-metrics-")
    prepare_multiproc_dir(path)
    uid, gid = twistd.get("uid"), twistd.get("gid")
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    return path


def _own_arguments() -> list[str]:
    """The arguments ``maitred`` was given on this twistd command line (a worker gets
    the same ones)."""
    argv = sys.argv[1:]
    if "maitred" not in argv:
        raise usage.UsageError("--workers works from the twistd command line only")
    return argv[argv.index("maitred") + 1 :]


class _ProvidesLogObserver:
    """Gives twistd its log observer, twistd's own with a cheaper formatter
    (``maitred_tx.textlog``), the one way a plugin can: as the application's
    ILogObserver component."""

    text_log: Any = None

    def setServiceParent(self, parent: Any) -> None:
        if (
            self.text_log is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.text_log)
        super().setServiceParent(parent)  # type: ignore[misc]


class _TwistdService(_ProvidesLogObserver, SMTPService):
    """The service ``twistd maitred`` runs."""


class _TwistdPool(_ProvidesLogObserver, WorkerPool):
    """The supervisor ``twistd maitred --workers N`` runs."""


def _bytes_users(checker: Any) -> Any:
    """twisted.cred's ``memory:`` strcred plugin stores str names and passwords, while
    the credentials it is asked about carry bytes (as twisted.mail's do): no login could
    ever succeed.  Store them as UTF-8 bytes, as the checker documents."""
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode("utf-8") if isinstance(k, str) else k):
            (v.encode("utf-8") if isinstance(v, str) else v)
            for k, v in checker.users.items()
        }
    return checker


@implementer(IRealm)
class DeliveryRealm:
    """Every authenticated user is served by the one configured delivery."""

    def __init__(self, delivery: Any) -> None:
        self.delivery = delivery

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        for interface in interfaces:
            if interface.providedBy(self.delivery):
                return interface, self.delivery, lambda: None
        raise LookupError("the delivery provides none of the asked interfaces")
