"""Mail transactions as pure state machines: what the client writes, given the
server's replies (fed whole, line by line and byte by byte), and what each recipient's
outcome is.  PIPELINING and not, DATA and BDAT, SMTP and LMTP, and the failures."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maitred_tx.client.body import scan_body
from maitred_tx.client.errors import ConnectionLost, ServerRefused
from maitred_tx.client.extensions import parse_ehlo
from maitred_tx.client.message import InvalidBody
from maitred_tx.client.replies import ServerReply
from maitred_tx.client.session import ClientSession
from maitred_tx.client.timeouts import Phase
from maitred_tx.client.transaction import Outcome, Transaction
from maitred_tx.testing import pieces

SMTP_FULL = ("mx.test", "PIPELINING", "SIZE 100000", "8BITMIME", "BINARYMIME", "CHUNKING",
             "ENHANCEDSTATUSCODES", "DSN", "SMTPUTF8")
NO_PIPELINING = ("mx.test", "8BITMIME", "ENHANCEDSTATUSCODES")
NO_CHUNKING = ("mx.test", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
LMTP_FULL = SMTP_FULL


class Driver:
    """A session that has said EHLO, and one transaction in it."""

    def __init__(self, offered=SMTP_FULL, *, lmtp=False, mode="whole"):
        self.session = ClientSession(host="mx.test", helo="client.test", lmtp=lmtp)
        self.session.extensions = parse_ehlo(ServerReply(250, None, offered))
        self.session.hello_reply = ServerReply(250, None, offered)
        self.session.parser.enhanced = True
        self.mode = mode
        self.tx: Transaction | None = None

    def begin(self, rcpts, body=b"Subject: t\r\n\r\nhi\r\n", chunks=None, **kw) -> bytes:
        """Start a transaction; *chunks* makes the body a stream of those chunks."""
        scan = None if chunks is not None else scan_body(body)
        if chunks is None:
            kw.setdefault("size", len(body))
        self.tx = self.session.transaction("a@b.org", rcpts, scan=scan, **kw)
        self.chunks = list(chunks) if chunks is not None else [body]
        return self.tx.start(self.chunks.pop(0), not self.chunks)

    def replies(self, wire: bytes) -> bytes:
        """Feed the server's *wire* bytes; everything the client wrote meanwhile."""
        out = b""
        for piece in pieces(wire, self.mode):
            self.session.receive_data(piece)
            while (reply := self.session.next_reply()) is not None:
                out += self.tx.on_reply(reply)
        return out

    def pump(self) -> bytes:
        """Send body chunks while the transaction wants them."""
        out = b""
        while self.tx.wants_body:
            chunk = self.chunks.pop(0)
            out += self.tx.body_chunk(chunk, not self.chunks)
        return out

    def outcomes(self):
        return [(r.recipient, r.outcome, r.reply.code if r.reply else None)
                for r in self.tx.result.recipients]


MODES = ["whole", "lines", "bytes"]
OK = b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_data_one_write_and_per_recipient_results(mode):
    d = Driver(NO_CHUNKING, mode=mode)
    first = d.begin(["x@example.com", "bad@example.com", "y@example.com"],
                    body=b"Subject: t\r\n\r\n.dot\r\n")
    assert first == (b"MAIL FROM:<a@b.org>\r\nRCPT TO:<x@example.com>\r\n"
                     b"RCPT TO:<bad@example.com>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n")
    assert d.tx.phase is Phase.MAIL
    body = d.replies(b"250 2.1.0 Sender OK\r\n250 2.1.5 OK\r\n550-5.1.1 No such\r\n"
                     b"550 5.1.1 user\r\n250 2.1.5 OK\r\n354 Go ahead\r\n")
    assert body == b"Subject: t\r\n\r\n..dot\r\n.\r\n"
    assert d.tx.phase is Phase.DATA_DONE and not d.tx.done
    assert d.replies(b"250 2.0.0 Queued as 1234\r\n") == b""
    assert d.tx.done and not d.tx.needs_rset
    assert d.outcomes() == [("x@example.com", Outcome.DELIVERED, 250),
                            ("bad@example.com", Outcome.PERMANENT, 550),
                            ("y@example.com", Outcome.DELIVERED, 250)]
    result = d.tx.result
    assert result.data_reply.lines == ("Queued as 1234",)
    assert result["bad@example.com"].reply.lines == ("No such", "user")
    assert [r.recipient for r in result.delivered] == ["x@example.com", "y@example.com"]


def test_all_recipients_refused_but_data_354_sends_a_lone_dot():
    # RFC 2920 3.1: check DATA's reply too; after 354 send "." (Postfix does).
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com", "y@example.com"])
    out = d.replies(b"250 2.1.0 OK\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n354 go\r\n")
    assert out == b".\r\n"
    d.replies(b"554 5.5.1 No valid recipients\r\n")
    assert d.tx.done and not d.tx.needs_rset
    assert d.outcomes() == [("x@example.com", Outcome.PERMANENT, 550),
                            ("y@example.com", Outcome.TEMPORARY, 450)]


def test_all_recipients_refused_and_data_refused_sends_nothing_more():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com"])
    out = d.replies(b"250 2.1.0 OK\r\n550 5.1.1 no\r\n554 5.5.1 No valid recipients\r\n")
    assert out == b"" and d.tx.done
    assert d.tx.needs_rset  # MAIL was accepted: the next transaction starts with RSET
    assert d.outcomes() == [("x@example.com", Outcome.PERMANENT, 550)]
    follow = d.begin(["y@example.com"])
    assert follow.startswith(b"RSET\r\nMAIL FROM:<a@b.org>")


def test_refused_mail_fails_everyone_with_its_reply():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com", "y@example.com"])
    d.replies(b"451 4.3.0 Try later\r\n503 5.5.1 Need MAIL\r\n503 5.5.1 Need MAIL\r\n"
              b"503 5.5.1 Need MAIL\r\n")
    assert d.tx.done and not d.tx.needs_rset
    assert d.outcomes() == [("x@example.com", Outcome.TEMPORARY, 451),
                            ("y@example.com", Outcome.TEMPORARY, 451)]
    assert d.tx.result["x@example.com"].rcpt_reply.code == 503


def test_rcpt_accepted_after_a_refused_mail_gets_no_body():
    """A server out of step (one still holding an old transaction answers MAIL with
    503 and then takes RCPTs): the pipelined DATA's 354 gets a lone "." only."""
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com"], body=b"Subject: t\r\n\r\nsecret\r\n")
    out = d.replies(b"503 5.5.1 Sender already specified\r\n250 2.1.5 OK\r\n354 go\r\n")
    assert out == b".\r\n"
    d.replies(OK)
    assert d.tx.done and d.outcomes() == [("x@example.com", Outcome.PERMANENT, 503)]


@pytest.mark.parametrize("mode", MODES)
def test_without_pipelining_one_command_per_reply(mode):
    d = Driver(NO_PIPELINING, mode=mode)
    assert d.begin(["x@example.com", "y@example.com"]) == b"MAIL FROM:<a@b.org>\r\n"
    assert d.replies(b"250 2.1.0 OK\r\n") == b"RCPT TO:<x@example.com>\r\n"
    assert d.replies(b"550 5.1.1 no\r\n") == b"RCPT TO:<y@example.com>\r\n"
    assert d.replies(b"250 2.1.5 OK\r\n") == b"DATA\r\n"
    assert d.replies(b"354 go\r\n") == b"Subject: t\r\n\r\nhi\r\n.\r\n"
    d.replies(OK)
    assert d.outcomes() == [("x@example.com", Outcome.PERMANENT, 550),
                            ("y@example.com", Outcome.DELIVERED, 250)]


def test_without_pipelining_refused_mail_sends_no_rcpt_and_no_recipient_no_data():
    d = Driver(NO_PIPELINING)
    d.begin(["x@example.com"])
    assert d.replies(b"550 5.7.1 Go away\r\n") == b"" and d.tx.done
    d.begin(["x@example.com"])
    assert d.replies(b"250 2.1.0 OK\r\n") == b"RCPT TO:<x@example.com>\r\n"
    assert d.replies(b"550 5.1.1 no\r\n") == b"" and d.tx.done and d.tx.needs_rset


def test_bdat_small_message_goes_in_the_first_write():
    d = Driver()
    out = d.begin(["x@example.com"], body=b"Hi\r\n")
    assert out == (b"MAIL FROM:<a@b.org> SIZE=4\r\nRCPT TO:<x@example.com>\r\n"
                   b"BDAT 4 LAST\r\nHi\r\n")
    d.replies(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.0.0 Queued\r\n")
    assert d.tx.done and d.outcomes() == [("x@example.com", Outcome.DELIVERED, 250)]


def test_bdat_stream_waits_for_the_rcpt_replies_then_pipelines_the_chunks():
    d = Driver()
    out = d.begin(["x@example.com"], chunks=[b"aaa", b"bbb", b"cc\r\n"])
    assert out.endswith(b"BDAT 3\r\naaa") and b"SIZE" not in out  # size unknown
    assert not d.tx.wants_body  # not before we know a recipient was taken
    d.replies(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    assert d.tx.wants_body
    assert d.pump() == b"BDAT 3\r\nbbbBDAT 4 LAST\r\ncc\r\n"
    d.replies(b"250 2.0.0 3 octets\r\n250 2.0.0 3 octets\r\n")
    assert not d.tx.done
    d.replies(b"250 2.0.0 Queued\r\n")
    assert d.tx.done and d.outcomes() == [("x@example.com", Outcome.DELIVERED, 250)]


def test_bdat_stream_not_sent_when_every_recipient_is_refused():
    d = Driver()
    d.begin(["x@example.com"], chunks=[b"aaa", b"bbb"])
    d.replies(b"250 2.1.0 OK\r\n550 5.1.1 no\r\n")
    assert not d.tx.wants_body
    d.replies(b"554 5.5.1 No valid recipients\r\n")
    assert d.tx.done and d.tx.needs_rset  # RFC 3030 2: RSET after a failed BDAT


@pytest.mark.parametrize(("rcpt", "decided"), [(b"550 5.1.1 no\r\n", 550),
                                               (b"250 2.1.5 OK\r\n", 554)])
def test_refused_bdat_last_is_followed_by_rset(rcpt, decided):
    """A body in one chunk goes as BDAT n LAST; its refusal (no recipient, or the
    content) leaves the server's transaction open (RFC 3030 2), unlike DATA's."""
    d = Driver()
    assert b"BDAT 18 LAST\r\n" in d.begin(["x@example.com"])
    d.replies(b"250 2.1.0 OK\r\n" + rcpt + b"554 5.5.1 No valid recipients\r\n")
    assert d.tx.done and d.tx.needs_rset
    assert d.outcomes() == [("x@example.com", Outcome.PERMANENT, decided)]
    assert d.begin(["y@example.com"]).startswith(b"RSET\r\nMAIL FROM:<a@b.org>")


def test_bdat_failure_stops_the_chunks_and_the_next_transaction_resets():
    d = Driver()
    d.begin(["x@example.com"], chunks=[b"a", b"b", b"c", b"d"])
    d.replies(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n")
    d.tx.body_chunk(d.chunks.pop(0), False)  # "b" goes out pipelined
    d.replies(b"452 4.3.1 Insufficient storage\r\n")  # the reply to "a"
    assert not d.tx.wants_body and not d.tx.done  # "b" is still to be answered
    d.replies(b"503 5.5.1 Bad sequence\r\n")
    assert d.tx.done and d.tx.needs_rset
    assert d.outcomes() == [("x@example.com", Outcome.TEMPORARY, 452)]
    assert d.begin(["x@example.com"]).startswith(b"RSET\r\n")


def test_bdat_without_pipelining_waits_for_each_chunk():
    d = Driver(("mx.test", "CHUNKING", "8BITMIME"))
    d.begin(["x@example.com"], chunks=[b"a", b"b", b"c"])
    d.replies(b"250 OK\r\n")
    assert d.replies(b"250 OK\r\n") == b"BDAT 1\r\na"
    assert not d.tx.wants_body
    d.replies(b"250 OK\r\n")
    assert d.tx.wants_body and d.pump() == b"BDAT 1\r\nb"  # one, then its reply
    assert not d.tx.wants_body
    d.replies(b"250 OK\r\n")
    assert d.tx.wants_body and d.pump() == b"BDAT 1 LAST\r\nc"
    d.replies(b"250 OK\r\n")
    assert d.tx.done and d.tx.result.all_delivered


@pytest.mark.parametrize("offered", [NO_CHUNKING, LMTP_FULL])
def test_lmtp_one_reply_per_accepted_recipient(offered):
    d = Driver(offered, lmtp=True)
    d.begin(["a@example.com", "gone@example.com", "b@example.com", "full@example.com"])
    d.replies(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 gone\r\n250 2.1.5 OK\r\n"
              b"250 2.1.5 OK\r\n" + (b"354 go\r\n" if offered is NO_CHUNKING else b""))
    assert d.tx.phase is Phase.DATA_DONE
    d.replies(b"250 2.0.0 a stored\r\n250 2.0.0 b stored\r\n")
    assert not d.tx.done
    d.replies(b"452 4.2.2 Mailbox full\r\n")
    assert d.tx.done and not d.tx.needs_rset
    assert d.outcomes() == [("a@example.com", Outcome.DELIVERED, 250),
                            ("gone@example.com", Outcome.PERMANENT, 550),
                            ("b@example.com", Outcome.DELIVERED, 250),
                            ("full@example.com", Outcome.TEMPORARY, 452)]
    assert d.tx.result["b@example.com"].reply.lines == ("b stored",)


def test_421_fails_what_is_open_and_closes():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com", "y@example.com"])
    d.replies(b"250 2.1.0 OK\r\n550 5.1.1 no\r\n421 4.3.2 Shutting down\r\n")
    assert d.tx.done and d.tx.must_close and d.session.closing
    assert d.outcomes() == [("x@example.com", Outcome.PERMANENT, 550),
                            ("y@example.com", Outcome.TEMPORARY, 421)]
    assert isinstance(d.tx.result.error, ServerRefused) and d.tx.result.error.temporary


def test_connection_lost_after_the_body_leaves_accepted_recipients_temporary():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com", "y@example.com"])
    d.replies(b"250 2.1.0 OK\r\n250 OK\r\n550 5.1.1 no\r\n354 go\r\n")
    d.tx.connection_lost(ConnectionLost("lost"))
    assert d.tx.done
    assert d.outcomes() == [("x@example.com", Outcome.TEMPORARY, None),
                            ("y@example.com", Outcome.PERMANENT, 550)]
    assert isinstance(d.tx.result.error, ConnectionLost)


def test_a_reply_in_the_middle_of_the_body_fails_and_closes():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com"], chunks=[b"a\r\n", b"b\r\n"])
    d.replies(b"250 OK\r\n250 OK\r\n354 go\r\n")
    assert d.tx.wants_body
    d.replies(b"552 5.3.4 Too big\r\n")
    assert d.tx.done and d.tx.must_close
    assert d.outcomes() == [("x@example.com", Outcome.PERMANENT, 552)]


@pytest.mark.parametrize("offered", [NO_CHUNKING, SMTP_FULL])
def test_a_stream_that_turns_out_binary_is_aborted_before_the_bad_chunk(offered):
    d = Driver(offered)
    d.begin(["x@example.com"], chunks=[b"text\r\n", b"bare\nLF\r\n", b"more\r\n"])
    d.replies(b"250 OK\r\n250 OK\r\n" + (b"354 go\r\n" if offered is NO_CHUNKING else b""))
    with pytest.raises(InvalidBody, match="bare LF"):
        d.tx.body_chunk(d.chunks.pop(0), False)
    d.tx.abort(InvalidBody("bare LF"))
    if offered is NO_CHUNKING:
        assert d.tx.done and d.tx.must_close  # DATA cannot be cancelled but by closing
    else:
        assert not d.tx.done and not d.tx.must_close  # BDAT "text" is still answered
        d.replies(b"250 2.0.0 6 octets\r\n")
        assert d.tx.done and d.tx.needs_rset


def test_a_first_chunk_that_is_not_text_raises_before_anything_is_sent():
    d = Driver(NO_CHUNKING)
    with pytest.raises(InvalidBody):
        d.begin(["x@example.com"], chunks=[b"\0binary", b"x"])


def test_a_transaction_that_never_started_keeps_the_rset_owed():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com"])
    d.replies(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n554 5.5.1 Not now\r\n")  # DATA refused
    assert d.session.needs_rset
    with pytest.raises(InvalidBody):  # the next body fails before a byte is sent
        d.begin(["x@example.com"], chunks=[b"\0binary", b"x"])
    assert d.session.needs_rset  # the server still holds the first MAIL
    assert d.begin(["x@example.com"]).startswith(b"RSET\r\nMAIL FROM:")


_CODES = st.sampled_from([250, 251, 450, 451, 452, 550, 551, 553])


@settings(max_examples=150, deadline=None)
@given(st.lists(_CODES, min_size=1, max_size=6), st.sampled_from([250, 451, 554]),
       st.sampled_from([SMTP_FULL, NO_CHUNKING, NO_PIPELINING]), st.booleans())
def test_outcomes_follow_rcpt_and_final_replies(rcpt_codes, final, offered, lmtp):
    """Whatever each RCPT gets and whatever the end of data gets, each recipient's
    outcome is its RCPT refusal or else the final reply's class; with PIPELINING the
    client writes once before any reply."""
    d = Driver(offered, lmtp=lmtp)
    rcpts = [f"r{i}@example.com" for i in range(len(rcpt_codes))]
    first = d.begin(rcpts)
    pipelined, bdat = "PIPELINING" in offered, "CHUNKING" in offered
    assert first.count(b"RCPT TO") == (len(rcpts) if pipelined else 0)
    d.replies(b"250 2.1.0 OK\r\n")
    for code in rcpt_codes:
        d.replies(f"{code} {str(code)[0]}.1.5 x\r\n".encode())
    accepted = [c for c in rcpt_codes if c < 300]
    if accepted and not bdat:
        d.replies(b"354 go\r\n")
    elif not accepted and (pipelined or bdat):
        d.replies(b"554 5.5.1 No valid recipients\r\n")
    if accepted:
        status = f"{str(final)[0]}.0.0"
        for _ in accepted if lmtp else [0]:
            d.replies(f"{final} {status} end\r\n".encode())
    assert d.tx.done
    expected = {2: Outcome.DELIVERED, 4: Outcome.TEMPORARY, 5: Outcome.PERMANENT}
    for (_, outcome, code), rcpt_code in zip(d.outcomes(), rcpt_codes, strict=True):
        decided = rcpt_code if rcpt_code >= 300 else final
        assert (outcome, code) == (expected[decided // 100], decided)


def test_a_positive_reply_out_of_step_never_counts_as_delivered():
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com"])
    d.replies(b"250 OK\r\n250 OK\r\n250 2.0.0 OK but not 354\r\n")
    assert d.tx.done and d.outcomes() == [("x@example.com", Outcome.TEMPORARY, 250)]
    d = Driver(NO_CHUNKING)
    d.begin(["x@example.com"], chunks=[b"a\r\n", b"b\r\n"])
    d.replies(b"250 OK\r\n250 OK\r\n354 go\r\n250 2.0.0 too early\r\n")
    assert d.tx.must_close and d.outcomes() == [("x@example.com", Outcome.TEMPORARY, 250)]
