"""Transaction plans (pure): the MAIL/RCPT lines and their parameters for what the
server offers, and the refusals that happen before a byte of the message is sent.
Every line we build is read back by the server's own command parser."""

from __future__ import annotations

import pytest

from maitred_tx.client.body import scan_body
from maitred_tx.client.errors import ExtensionUnsupported, InvalidAddress, MessageTooBig
from maitred_tx.client.extensions import NO_EXTENSIONS, parse_ehlo
from maitred_tx.client.message import (
    DSN,
    InvalidBody,
    Recipient,
    orcpt_value,
    plan_transaction,
)
from maitred_tx.client.replies import ServerReply
from maitred_tx.smtp.commands import MailFrom, RcptTo, parse_command
from maitred_tx.smtp.params import BodyType, Notify, Ret

FULL = parse_ehlo(ServerReply(250, None, (
    "mx.test", "PIPELINING", "SIZE 1000", "8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8",
    "ENHANCEDSTATUSCODES", "DSN")))
PLAIN = parse_ehlo(ServerReply(250, None, ("mx.test", "PIPELINING", "8BITMIME")))


def plan(*, ext=FULL, sender="a@b.org", rcpts=("x@example.com",), **kw):
    return plan_transaction(sender, list(rcpts), ext, host="mx.test", **kw)


def parsed(line: bytes):
    command = parse_command(line[:-2])
    assert isinstance(command, MailFrom | RcptTo), command
    return command


def test_full_featured_server():
    p = plan(size=120, scan=scan_body("é\r\n".encode()),
             dsn=DSN(ret=Ret.HDRS, envid="id+1=x", notify=frozenset({Notify.FAILURE})),
             rcpts=["x@example.com", Recipient("y@example.com", orcpt="Y@Example.com",
                                               notify=frozenset({Notify.NEVER}))])
    assert p.mail == b"MAIL FROM:<a@b.org> SIZE=120 BODY=8BITMIME RET=HDRS ENVID=id+2B1+3Dx\r\n"
    assert p.rcpts == (b"RCPT TO:<x@example.com> NOTIFY=FAILURE\r\n",
                       b"RCPT TO:<y@example.com> NOTIFY=NEVER ORCPT=rfc822;Y@Example.com\r\n")
    mail = parsed(p.mail)
    assert (mail.params.size, mail.params.body, mail.params.envid) == (
        120, BodyType.EIGHT_BIT_MIME, "id+1=x")
    assert parsed(p.rcpts[1]).params.orcpt == ("rfc822", "Y@Example.com")
    assert p.pipelined and p.bdat and not p.verify and not p.reset_first


def test_nothing_offered_nothing_sent():
    p = plan(ext=NO_EXTENSIONS, size=10, dsn=DSN(ret=Ret.FULL), scan=scan_body(b"hi\r\n"))
    assert p.mail == b"MAIL FROM:<a@b.org>\r\n"
    assert p.rcpts == (b"RCPT TO:<x@example.com>\r\n",)
    assert not p.pipelined and not p.bdat


def test_null_sender_brackets_and_postmaster():
    p = plan(sender="", rcpts=["<x@example.com>", "Postmaster"])
    assert p.mail == b"MAIL FROM:<> BODY=8BITMIME\r\n"  # a stream: assumed 8-bit text
    assert p.rcpts == (b"RCPT TO:<x@example.com>\r\n", b"RCPT TO:<Postmaster>\r\n")


@pytest.mark.parametrize("address", [
    "x@example.com>\r\nRCPT TO:<evil@example.com", "no-at-sign", "a@b@c", "a@-bad-.com",
    "@a,@b:x@example.com", "x\n@example.com", "",
])
def test_invalid_addresses_are_refused_before_sending(address):
    with pytest.raises(InvalidAddress) as caught:
        plan(rcpts=[address])
    assert caught.value.permanent


def test_idn_domain_goes_as_a_label_and_needs_no_smtputf8():
    p = plan(ext=PLAIN, sender="a@bücher.example", rcpts=["x@münchen.de"],
             scan=scan_body(b"7-bit text\r\n"))
    assert p.mail == b"MAIL FROM:<a@xn--bcher-kva.example>\r\n"
    assert p.rcpts == (b"RCPT TO:<x@xn--mnchen-3ya.de>\r\n",)


def test_utf8_local_part_needs_smtputf8():
    p = plan(rcpts=["jörg@example.com"])
    assert p.mail.endswith(b" SMTPUTF8\r\n")
    assert p.rcpts == ("RCPT TO:<jörg@example.com>\r\n".encode(),)
    with pytest.raises(ExtensionUnsupported) as caught:
        plan(ext=PLAIN, rcpts=["jörg@example.com"])
    assert caught.value.extension == "SMTPUTF8" and "mx.test" in str(caught.value)
    assert caught.value.permanent


def test_size_precheck():
    plan(size=1000)
    with pytest.raises(MessageTooBig, match=r"1001 octets.*SIZE 1000") as caught:
        plan(size=1001)
    assert caught.value.permanent


def test_body_types_choose_the_transfer():
    binary = plan(scan=scan_body(b"a\nb"))
    assert binary.bdat and b"BODY=BINARYMIME" in binary.mail
    with pytest.raises(ExtensionUnsupported, match="bare LF") as caught:
        plan(ext=PLAIN, scan=scan_body(b"a\nb"))
    assert caught.value.extension == "BINARYMIME"
    seven = parse_ehlo(ServerReply(250, None, ("mx", "PIPELINING")))
    with pytest.raises(ExtensionUnsupported) as caught:
        plan(ext=seven, scan=scan_body("é".encode()))
    assert caught.value.extension == "8BITMIME"
    # Declared types are checked against a scanned body.
    with pytest.raises(InvalidBody):
        plan(body_type=BodyType.SEVEN_BIT, scan=scan_body("é".encode()))
    # A stream (no scan) is assumed 8-bit text when 8BITMIME is there, and checked later.
    stream = plan(ext=PLAIN)
    assert stream.verify and not stream.bdat and b"BODY=8BITMIME" in stream.mail
    assert plan(ext=seven).body_type is BodyType.SEVEN_BIT
    assert not plan(body_type=BodyType.BINARY_MIME).verify


def test_chunking_can_be_declined():
    assert not plan(chunking=False, scan=scan_body(b"x\r\n")).bdat
    assert plan(chunking=False, scan=scan_body(b"x\n")).bdat  # binary needs BDAT


def test_dsn_values_are_checked():
    with pytest.raises(ValueError):
        DSN(notify=frozenset({Notify.NEVER, Notify.FAILURE}))
    with pytest.raises(ValueError):
        DSN(envid="x" * 101)
    with pytest.raises(ValueError):
        DSN(envid="has space")
    with pytest.raises(ValueError):
        Recipient("x@y.z", notify=frozenset())


def test_orcpt_for_international_addresses():
    assert orcpt_value("a+b@x.org") == "rfc822;a+2Bb@x.org"
    value = orcpt_value("jörg=1@x.org")
    assert value == "utf-8;j\\x{F6}rg\\x{3D}1@x.org"
    line = f"RCPT TO:<y@example.com> ORCPT={value}"
    assert parse_command(line.encode()).params.orcpt == ("utf-8", "jörg=1@x.org")


def test_no_recipients_is_a_usage_error():
    with pytest.raises(ValueError):
        plan(rcpts=[])
