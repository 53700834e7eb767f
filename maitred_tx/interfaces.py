"""The native plug-in interfaces.  A delivery decides about each step of the envelope
and receives the body as a stream of chunks — one copy for all recipients.

Every method may return its value directly, as a Deferred, or as a coroutine.  An
exception that is not an outcome becomes 451 4.3.0: the sender keeps the mail and
retries, so a bug in a delivery never loses or bounces a message.

twisted.mail's IMessageDelivery / IMessageDeliveryFactory work unchanged beside these
(see maitred_tx.delivery.compat).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IDelivery", "IMessageSink", "ISubmissionUser"]


class IDelivery(Interface):
    """Validates one session's envelope and opens the message sink.

    Subclass maitred_tx.delivery.base.Delivery to implement only what you need.
    """

    def hello(context):
        """EHLO/HELO/LHLO was received (context.helo).  None or Accepted to go on."""

    def mail_from(context, sender, params):
        """MAIL FROM: *sender* is a Mailbox or None (null path); *params* MailParams."""

    def rcpt_to(context, envelope, recipient, params):
        """RCPT TO for a recipient in a local domain (relay rules were applied already).

        *envelope* holds the sender and the recipients accepted so far.
        """

    def open_message(envelope):
        """The body starts: return an IMessageSink for *envelope* (all recipients)."""


class IMessageSink(Interface):
    """Receives one message body, binary-safe, in the order the bytes arrived."""

    envelope = Attribute("The Envelope this message belongs to.")

    def write(data):
        """More body bytes.  Return a Deferred to pause reading until it fires."""

    def close():
        """The body is complete: make it durable, then return the outcome.

        One Outcome applies to every recipient; a sequence gives one per recipient in
        envelope order (LMTP answers each; SMTP sends 250 only if all are accepted).
        Only return Accepted once the message is safely stored.
        """

    def abort():
        """The body will not complete (limit, RSET, lost connection): discard it."""


class ISubmissionUser(Interface):
    """Optionally provided by the avatar a realm returns for an authenticated user.

    Without it, an identity that is an address may send as that address only, and a
    bare user name as that name at each local domain.
    """

    def allowed_senders(identity):
        """The addresses *identity* may use in MAIL FROM and From: (case-insensitive)."""

    def may_act_as(identity, authzid):
        """True if *identity* may authorize as *authzid* (RFC 4616 2: SASL PLAIN's
        authorization identity); the default refuses any authzid but the identity."""
