"""twisted.mail deliveries, unchanged: IMessageDelivery / IMessageDeliveryFactory
adapted to our IDelivery.

The calls and their arguments are twisted.mail's own (twisted.mail.smtp.SMTP):
IMessageDeliveryFactory.getMessageDelivery() and validateFrom((helo, peer ip),
Address) at each MAIL, validateTo(User) at RCPT returning a
message factory, receivedHeader(helo, origin, [user]) and one IMessage per recipient at
DATA, IMessage.lineReceived per line without CRLF (dot-unstuffed), eomReceived at the
end and connectionLost when the message is abandoned.  SMTPServerError codes are sent
as the delivery chose them.  One deliberate difference: where twisted.mail answers 550
to an exception in eomReceived (the sender bounces the mail), we answer 451 4.3.0 so
that the sender retries: a bug must not lose mail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.mail.smtp import Address, SMTPBadSender, SMTPServerError, User
from twisted.python.failure import Failure
from zope.interface import implementer

from maitred_tx.envelope import Envelope, SessionContext
from maitred_tx.interfaces import IDelivery, IMessageSink
from maitred_tx.outcomes import Accepted, Outcome, PermanentFailure, TemporaryFailure
from maitred_tx.smtp.address import Mailbox
from maitred_tx.smtp.params import MailParams, RcptParams

__all__ = ["TwistedMailDelivery", "delivery_provider"]

_log = Logger()


def delivery_provider(delivery: Any) -> Callable[[], Any]:
    """Per-connection IDelivery for any supported delivery object."""
    if IDelivery.providedBy(delivery):
        return lambda: delivery
    if IMessageDeliveryFactory.providedBy(delivery):
        # Asked at each MAIL FROM ("called once per message"), as twisted.mail does.
        return lambda: TwistedMailDelivery(factory=delivery)
    if IMessageDelivery.providedBy(delivery):
        return lambda: TwistedMailDelivery(delivery)
    raise TypeError(
        f"{delivery!r} provides neither maitred_tx IDelivery nor twisted.mail "
        "IMessageDelivery / IMessageDeliveryFactory"
    )


def _address(mailbox: Mailbox | None) -> bytes:
    return b"" if mailbox is None else str(mailbox).encode("utf-8")


def _outcome(failure: Failure, default_status: str) -> Outcome:
    """SMTPServerError keeps its code; anything else is a temporary local error."""
    error = failure.value
    if isinstance(error, SMTPServerError):
        code = int(error.code)
        text = error.resp.decode("utf-8", "replace") if isinstance(error.resp, bytes) \
            else str(error.resp)
        if isinstance(error, SMTPBadSender):
            text = f"Cannot receive from specified address <{error.addr}>: {text}"
        if 500 <= code < 600:
            return PermanentFailure(text, code if 550 <= code <= 559 else 550, default_status)
        return TemporaryFailure(text, code if 450 <= code <= 459 else 451, "4.3.0")
    _log.failure("twisted.mail delivery raised", failure)
    return TemporaryFailure("Local error in processing, try again later")


class _ProtocolShim:
    """What twisted.mail's User reads from its protocol argument (the default domain)."""

    def __init__(self, context: SessionContext) -> None:
        self.host = context.hostname.encode("idna")
        self.transport = None


@implementer(IDelivery)
class TwistedMailDelivery:
    """One connection's view of a twisted.mail IMessageDelivery."""

    def __init__(self, delivery: Any = None, factory: Any = None) -> None:
        self.delivery: Any = None if delivery is None else IMessageDelivery(delivery)
        self._factory = None if factory is None else IMessageDeliveryFactory(factory)
        self._origin: Address | None = None
        self._recipients: list[tuple[User, Callable[[], Any]]] = []

    def _helo(self, context: SessionContext) -> tuple[bytes, bytes]:
        return ((context.helo or "").encode("utf-8"), context.peer_host.encode("ascii"))

    def hello(self, context: SessionContext) -> None:
        return None

    def mail_from(
        self, context: SessionContext, sender: Mailbox | None, params: MailParams
    ) -> Deferred[Outcome | None]:
        self._recipients = []
        origin = Address(_address(sender), _ProtocolShim(context).host)

        def validated(result: Any) -> None:
            self._origin = result if isinstance(result, Address) else origin
            return None

        def validate() -> Any:
            if self._factory is not None:  # a new delivery for each message
                self.delivery = IMessageDelivery(self._factory.getMessageDelivery())
            return self.delivery.validateFrom(self._helo(context), origin)

        d = maybeDeferred(validate)
        return d.addCallbacks(validated, _outcome, errbackArgs=("5.7.1",))

    def rcpt_to(
        self,
        context: SessionContext,
        envelope: Envelope,
        recipient: Mailbox,
        params: RcptParams,
    ) -> Deferred[Outcome | None]:
        user = User(_address(recipient), self._helo(context), _ProtocolShim(context),
                    self._origin)

        def validated(factory: Callable[[], Any]) -> None:
            self._recipients.append((user, factory))
            return None

        d = maybeDeferred(self.delivery.validateTo, user)
        return d.addCallbacks(validated, _outcome, errbackArgs=("5.1.1",))

    def open_message(self, envelope: Envelope) -> _CompatSink:
        helo = self._helo(envelope.session)
        messages = []
        for user, factory in self._recipients:
            message = factory()
            header = self.delivery.receivedHeader(helo, self._origin, [user])
            if header:
                message.lineReceived(header if isinstance(header, bytes) else header.encode())
            messages.append(message)
        self._recipients = []
        return _CompatSink(envelope, messages)


@implementer(IMessageSink)
class _CompatSink:
    """Feeds twisted.mail IMessages line by line, as twisted.mail's DATA state does."""

    def __init__(self, envelope: Envelope, messages: list[Any]) -> None:
        self.envelope = envelope
        self._messages = messages
        self._partial = b""
        self._in_header = self._in_body = False
        self._failed: SMTPServerError | None = None

    def write(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if self._failed is not None:
            return
        try:
            # twisted.mail inserts an empty line when the message has no header block.
            if not self._in_header and not self._in_body:
                if b":" in line:
                    self._in_header = True
                elif line:
                    for message in self._messages:
                        message.lineReceived(b"")
                    self._in_body = True
            if not line:
                self._in_body = True
            for message in self._messages:
                message.lineReceived(line)
        except SMTPServerError as e:
            self._failed = e
            self.abort()

    def close(self) -> Deferred[list[Outcome]] | list[Outcome]:
        if self._partial:  # BDAT bodies need not end with CRLF
            self._line(self._partial)
            self._partial = b""
        count = len(self.envelope.recipients)
        if self._failed is not None:
            return [_outcome(Failure(self._failed), "5.6.0")] * count
        eoms = [maybeDeferred(m.eomReceived) for m in self._messages]

        def handled(results: list[tuple[bool, Any]]) -> list[Outcome]:
            outcomes: list[Outcome] = [
                Accepted("Delivery in progress") if ok else _outcome(result, "5.3.0")
                for ok, result in results
            ]
            # twisted.mail gives one answer for all: any failure fails the message.
            failed = [o for o in outcomes if not isinstance(o, Accepted)]
            return [failed[0]] * count if failed else [Accepted("Delivery in progress")] * count

        return DeferredList(eoms, consumeErrors=True).addCallback(handled)

    def abort(self) -> None:
        for message in self._messages:
            try:
                message.connectionLost()
            except Exception:
                _log.failure("IMessage.connectionLost raised")
