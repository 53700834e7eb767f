"""The reply catalogue: the only place where reply text lives.

Every reply carries its RFC 5321 basic code and, where RFC 3463 / RFC 5248 define one,
its enhanced status code.  The enhanced code is sent only once the client has greeted
with EHLO or LHLO (RFC 2034 section 3); the greeting and the EHLO reply never carry one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

__all__ = ["Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, optional enhanced status code, one or more text lines."""

    code: int
    status: str | None
    text: tuple[str, ...]
    # The wire forms (without, with the enhanced code), built on first use: replies are
    # mostly catalogue constants sent over and over.  Not part of the value.
    _wire: tuple[bytes, bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad reply code {self.code}")
        if self.status is not None and self.status[0] != str(self.code)[0]:
            # RFC 3463 section 2: the class digits must agree.
            raise ValueError(f"enhanced code {self.status} does not match {self.code}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, *text: str) -> Reply:
        """The same codes with other text (the delivery may choose its own wording)."""
        return replace(self, text=tuple(text) or self.text)

    def format(self, **fields: str) -> Reply:
        """Fill ``{name}`` placeholders of the catalogue text."""
        return replace(self, text=tuple(t.format(**fields) for t in self.text))

    def encode(self, enhanced: bool = True) -> bytes:
        """Wire form, CRLF-terminated; multi-line replies use ``code-`` continuation."""
        wire = self._wire
        if wire is None:
            wire = (self._encode(False), self._encode(True))
            object.__setattr__(self, "_wire", wire)  # a cache, not a change of value
        return wire[1] if enhanced else wire[0]

    def _encode(self, enhanced: bool) -> bytes:
        prefix = f"{self.status} " if enhanced and self.status else ""
        lines = self.text or ("",)
        last = len(lines) - 1
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            # A reply line is never allowed to carry a line break of its own.
            clean = line.replace("\r", " ").replace("\n", " ")
            out.append(f"{self.code}{sep}{prefix}{clean}\r\n")
        return "".join(out).encode("utf-8", "replace")


def _r(code: int, status: str | None, *text: str) -> Reply:
    return Reply(code, status, tuple(text))


# --- 2xx -------------------------------------------------------------------------------
R220_GREETING: Final = _r(220, None, "{hostname} ESMTP maitred_tx")
R220_LMTP_GREETING: Final = _r(220, None, "{hostname} LMTP maitred_tx")
R221_BYE: Final = _r(221, "2.0.0", "Bye")
R250_HELO: Final = _r(250, None, "{hostname}")
R250_OK: Final = _r(250, "2.0.0", "OK")
R250_SENDER_OK: Final = _r(250, "2.1.0", "Sender OK")
R250_RCPT_OK: Final = _r(250, "2.1.5", "Recipient OK")
R250_RESET: Final = _r(250, "2.0.0", "Reset OK")
R250_QUEUED: Final = _r(250, "2.0.0", "OK: message accepted")
R250_CHUNK_OK: Final = _r(250, "2.0.0", "{size} octets received")
R252_CANNOT_VRFY: Final = _r(
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)
R214_HELP: Final = _r(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY",
    "See RFC 5321",
)
R354_START_DATA: Final = _r(354, None, "End data with <CR><LF>.<CR><LF>")

# --- 4xx -------------------------------------------------------------------------------
R421_SHUTTING_DOWN: Final = _r(421, "4.3.2", "{hostname} Service shutting down")
R421_TIMEOUT: Final = _r(421, "4.4.2", "{hostname} Timeout, closing connection")
R421_SESSION_TOO_LONG: Final = _r(421, "4.4.2", "{hostname} Session too long, closing")
R421_TOO_MANY_ERRORS: Final = _r(421, "4.7.0", "{hostname} Too many errors, closing")
R421_HEADER_TOO_BIG: Final = _r(421, "4.7.0", "{hostname} Header block too large, closing")
R451_LOCAL_ERROR: Final = _r(451, "4.3.0", "Local error in processing, try again later")
R451_DELIVERY_FAILED: Final = _r(451, "4.3.0", "Could not store message, try again later")
# Issue 5, --auth-temperror=defer: a DNS failure could change the authentication verdict
# (RFC 7208 8.6 asks for a 4xx on SPF temperror; RFC 3463 X.7.0: security, other).
R451_AUTH_TEMPERROR: Final = _r(
    451, "4.7.0", "Temporary failure checking sender authentication ({checks}), try again later"
)
R452_TOO_MANY_RCPTS: Final = _r(452, "4.5.3", "Too many recipients")
R452_NO_STORAGE: Final = _r(452, "4.3.1", "Insufficient system storage")

# --- 5xx: syntax and sequence ----------------------------------------------------------
R500_UNKNOWN_COMMAND: Final = _r(500, "5.5.2", "Command unrecognized")
R500_LINE_TOO_LONG: Final = _r(500, "5.5.2", "Command line too long")
R500_BARE_LF: Final = _r(500, "5.5.2", "Command line must end with <CR><LF>")
R500_BAD_CHARACTER: Final = _r(500, "5.5.2", "Command line contains invalid characters")
R501_SYNTAX: Final = _r(501, "5.5.4", "Syntax error in parameters or arguments")
R501_HELO_SYNTAX: Final = _r(501, "5.5.4", "Syntax: {verb} <domain or address literal>")
R501_MAIL_SYNTAX: Final = _r(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
R501_RCPT_SYNTAX: Final = _r(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
R501_PATH_SYNTAX: Final = _r(501, "5.1.7", "Bad address syntax")
R501_RCPT_PATH_SYNTAX: Final = _r(501, "5.1.3", "Bad recipient address syntax")
R501_NO_ARGUMENTS: Final = _r(501, "5.5.4", "{verb} takes no arguments")
R501_BDAT_SYNTAX: Final = _r(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
R501_BAD_PARAM_VALUE: Final = _r(501, "5.5.4", "Bad value for parameter {keyword}")
R501_DUPLICATE_PARAM: Final = _r(501, "5.5.4", "Parameter {keyword} given twice")
R502_NOT_IMPLEMENTED: Final = _r(502, "5.5.1", "Command not implemented")
R502_EXPN_DISABLED: Final = _r(502, "5.5.1", "EXPN is disabled")
R503_BAD_SEQUENCE: Final = _r(503, "5.5.1", "Bad sequence of commands")
R503_NEED_HELO: Final = _r(503, "5.5.1", "Send EHLO or HELO first")
R503_NEED_LHLO: Final = _r(503, "5.5.1", "Send LHLO first")
R503_NESTED_MAIL: Final = _r(503, "5.5.1", "Sender already specified")
R503_NEED_MAIL: Final = _r(503, "5.5.1", "Need MAIL command first")
R503_NEED_RCPT: Final = _r(503, "5.5.1", "Need RCPT command first")
R503_DATA_AFTER_BDAT: Final = _r(503, "5.5.1", "DATA not allowed after BDAT")
R503_BINARYMIME_NEEDS_BDAT: Final = _r(503, "5.5.1", "BODY=BINARYMIME requires BDAT")
R504_BAD_PARAM: Final = _r(504, "5.5.4", "Parameter not supported")
R555_UNKNOWN_PARAM: Final = _r(555, "5.5.4", "Unsupported parameter {keyword}")

# --- 5xx: policy and content -----------------------------------------------------------
R550_RELAY_DENIED: Final = _r(550, "5.7.1", "Relaying denied")
R550_NO_SUCH_USER: Final = _r(550, "5.1.1", "Recipient rejected")
# Issue 5, --dmarc-reject: the author domain's DMARC policy is p=reject and the message
# fails DMARC (RFC 7489 6.7; RFC 3463 X.7.1: delivery not authorized, message refused).
R550_DMARC_REJECT: Final = _r(
    550, "5.7.1", "Message rejected: it fails the DMARC policy of {domain}"
)
R550_SENDER_REJECTED: Final = _r(550, "5.7.1", "Sender rejected")
R550_BARE_LINE_ENDING: Final = _r(550, "5.6.0", "Message contains a bare <CR> or <LF>")
R550_NUL_CHARACTER: Final = _r(550, "5.6.0", "Message contains a NUL character")
R552_TOO_BIG: Final = _r(552, "5.3.4", "Message size exceeds fixed limit")
R552_HEADER_TOO_BIG: Final = _r(552, "5.3.4", "Message header block too large")
R553_NEEDS_SMTPUTF8: Final = _r(
    553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter"
)
R554_NO_VALID_RCPTS: Final = _r(554, "5.5.1", "No valid recipients")
R554_LINE_TOO_LONG: Final = _r(554, "5.6.0", "Message contains a line longer than {limit} octets")
# Loop detection (RFC 5321 6.3, Limits.max_hops): Postfix's words ("too many hops"), with
# RFC 3463 3.5's X.4.6 "Routing loop detected" where Postfix sends 5.4.0.
R554_TOO_MANY_HOPS: Final = _r(
    554, "5.4.6", "Too many hops ({count} Received: header fields, limit {limit})"
)
R554_TRANSACTION_FAILED: Final = _r(554, "5.0.0", "Transaction failed")
R221_HTTP: Final = _r(221, "2.7.0", "Not an HTTP server, goodbye")

# --- Issue 4 parsers: AUTH exchanges (sasl.py) and XCLIENT (xclient.py) ------------------
# RFC 4954 4: a malformed AUTH command; 5.5.4 "invalid command arguments" (RFC 3463 3.6).
R501_AUTH_SYNTAX: Final = _r(501, "5.5.4", "Syntax: AUTH <mechanism> [initial-response]")
# RFC 4954 4: "the server rejects the AUTH command with a 504 reply" for a mechanism it
# does not support; RFC 4954 6 / RFC 3463 3.6: 5.5.4.
R504_AUTH_MECHANISM: Final = _r(504, "5.5.4", "Unrecognized authentication type")
# RFC 4954 4: a "*" response cancels and "MUST" be answered 501; 5.7.0 "other security
# status" (RFC 3463 3.8), as Postfix and Exim send it.
R501_AUTH_CANCELED: Final = _r(501, "5.7.0", "Authentication canceled")
# RFC 4954 4: a response that is not BASE64 "MUST" be answered 501; 5.5.2 "syntax
# error" (RFC 3463 3.6): the line itself is malformed.
R501_AUTH_BASE64: Final = _r(501, "5.5.2", "Invalid base64")
# RFC 4616 2 (PLAIN) / LOGIN: decoded, but not the mechanism's message grammar (missing
# NUL, empty authcid or password, not UTF-8, field too long).  Still a syntax error of
# the response, not wrong credentials, so 501 5.5.2 and not 535 5.7.8.
R501_AUTH_MALFORMED: Final = _r(501, "5.5.2", "Malformed authentication response")
# RFC 4954 4 and 6: a line longer than the authentication buffer.
R500_AUTH_LINE_TOO_LONG: Final = _r(500, "5.5.6", "Authentication Exchange line is too long")
# XCLIENT (Postfix XCLIENT_README): every refusal is 501 5.5.4, as Postfix answers.
R501_XCLIENT_SYNTAX: Final = _r(501, "5.5.4", "Syntax: XCLIENT attribute=value ...")
R501_XCLIENT_UNKNOWN: Final = _r(501, "5.5.4", "Unknown XCLIENT attribute {attribute}")
R501_XCLIENT_BAD_VALUE: Final = _r(501, "5.5.4", "Bad XCLIENT {attribute} value")
R501_XCLIENT_DUPLICATE: Final = _r(501, "5.5.4", "XCLIENT attribute {attribute} given twice")

# --- TLS, AUTH, modes, proxies (RFC 3207, RFC 4954, RFC 6409, Postfix XCLIENT) ----------
R220_READY_TLS: Final = _r(220, "2.0.0", "Ready to start TLS")
R235_AUTH_OK: Final = _r(235, "2.7.0", "Authentication successful")
R421_TOO_MANY_AUTH_FAILURES: Final = _r(
    421, "4.7.0", "{hostname} Too many failed authentications, closing"
)
R421_CLIENT_LIMIT: Final = _r(421, "4.7.0", "{hostname} Too many connections from your address")
R421_CLIENT_RATE: Final = _r(421, "4.7.0", "{hostname} Too many connections, slow down")
R421_MESSAGE_RATE: Final = _r(421, "4.7.0", "{hostname} Too many messages, slow down")
R502_STARTTLS_UNAVAILABLE: Final = _r(502, "5.5.1", "STARTTLS not available")
R503_TLS_ACTIVE: Final = _r(503, "5.5.1", "TLS already active")
R503_AUTH_UNAVAILABLE: Final = _r(503, "5.5.1", "AUTH not available on this service")
R503_ALREADY_AUTHENTICATED: Final = _r(503, "5.5.1", "Already authenticated")
R503_AUTH_IN_TRANSACTION: Final = _r(503, "5.5.1", "AUTH not allowed during a mail transaction")
R530_AUTH_REQUIRED: Final = _r(530, "5.7.0", "Authentication required")
R530_TLS_REQUIRED: Final = _r(530, "5.7.0", "Must issue a STARTTLS command first")
R535_AUTH_FAILED: Final = _r(535, "5.7.8", "Authentication credentials invalid")
R538_ENCRYPTION_REQUIRED: Final = _r(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
R550_SENDER_NOT_OWNED: Final = _r(
    550, "5.7.1", "Sender address not owned by the authenticated user"
)
R550_XCLIENT_DENIED: Final = _r(550, "5.7.0", "XCLIENT not allowed")
