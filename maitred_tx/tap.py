"""`twistd maitred`: command-line options and makeService.  The dropin in
twisted/plugins/ only names this module, so plugin scans stay cheap."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from twisted.logger import Logger
from twisted.python import reflect, usage

from maitred_tx.service import DEFAULT_LISTEN, SMTPService
from maitred_tx.smtp.config import BareLineEndings, Config, Limits

__all__ = ["Options", "makeService"]

_log = Logger()
_DEFAULTS = Limits()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not a positive integer")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive number of seconds")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Receive mail over ESMTP into a Maildir (or your own delivery).  Listens on "
        "127.0.0.1:2525 and accepts mail for 'localhost' unless told otherwise; it is "
        "never an open relay unless --relay is given."
    )
    optFlags: ClassVar[list[list[Any]]] = [
        ["relay", None, "DANGEROUS: accept mail for every domain (an open relay "
                        "unless the listener is protected otherwise)."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["hostname", None, None, "Name used in the greeting, EHLO and Received: "
                                 "(default: this machine's name).", str],
        ["maildir", None, "./maildir", "Root of the Maildir tree for --delivery "
                                       "maildir: ROOT/<domain>/<local part>/."],
        ["delivery", None, "maildir", "Where mail goes: 'maildir', 'discard' (accepts "
                                      "and drops, for load tests) or "
                                      "'python:package.module.name' (an IDelivery, a "
                                      "twisted.mail IMessageDelivery(Factory), or a "
                                      "zero-argument factory of one)."],
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
        ["max-errors", None, _DEFAULTS.max_errors, "Errors per session before 421 and "
                                                   "close.", _positive_int],
        ["command-timeout", None, _DEFAULTS.command_timeout, "Seconds to wait for a "
                                                             "command.", _seconds],
        ["data-timeout", None, _DEFAULTS.data_timeout, "Seconds to wait for more message "
                                                       "data.", _seconds],
        ["session-deadline", None, _DEFAULTS.session_deadline, "Longest session in "
                                                               "seconds.", _seconds],
        ["bare-line-endings", None, "reject", "A bare CR or LF inside a message: "
                                              "'reject' (550 5.6.0) or 'accept' (store "
                                              "as sent).  Neither ever ends DATA."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["domain"] = []

    def opt_listen(self, description: str) -> None:
        """Twisted server endpoint string to listen on (repeatable; default
        tcp:2525:interface=127.0.0.1)."""
        self["listen"].append(description)

    def opt_domain(self, domain: str) -> None:
        """A domain to accept mail for (repeatable; default: localhost)."""
        self["domain"].append(domain)

    def postOptions(self) -> None:
        if self["bare-line-endings"] not in ("reject", "accept"):
            raise usage.UsageError("--bare-line-endings must be 'reject' or 'accept'")
        delivery = self["delivery"]
        if delivery not in ("maildir", "discard") and not delivery.startswith("python:"):
            raise usage.UsageError("--delivery must be maildir, discard or python:NAME")
        try:
            self.config = self.make_config()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def make_config(self) -> Config:
        import socket

        limits = Limits(
            max_command_line=self["max-command-line"],
            max_text_line=self["max-line"],
            max_header_block=self["max-header"],
            max_recipients=self["max-recipients"],
            max_message_size=self["max-size"],
            max_errors=self["max-errors"],
            command_timeout=self["command-timeout"],
            data_timeout=self["data-timeout"],
            session_deadline=self["session-deadline"],
        )
        return Config(
            hostname=self["hostname"] or socket.getfqdn(),
            local_domains=frozenset(self["domain"] or ["localhost"]),
            limits=limits,
            bare_line_endings=BareLineEndings(self["bare-line-endings"]),
            relay=bool(self["relay"]),
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
    obj = reflect.namedAny(name[len("python:") :])
    from maitred_tx.delivery.compat import delivery_provider

    try:
        delivery_provider(obj)
    except TypeError:
        obj = obj()  # a zero-argument factory, as `twistd web --wsgi` takes
        delivery_provider(obj)
    return obj


def makeService(options: Options) -> SMTPService:
    from twisted.internet import reactor  # only here: twistd's own entry point

    config = options.config
    delivery = load_delivery(options, reactor)
    if config.relay:
        _log.warn("--relay is set: mail for every domain is accepted (open relay)")
    listen = options["listen"] or [DEFAULT_LISTEN]
    return SMTPService(reactor, config, delivery, listen)
