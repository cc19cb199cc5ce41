"""The header blocks the gateway builds: values it adds never carry line breaks."""

from __future__ import annotations

import pytest

from gateway import headers as hdr


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_an_added_value_with_a_line_break_is_refused(value: str) -> None:
    with pytest.raises(hdr.UnsafeHeader):
        hdr.header_line(b"X-Metergate-Account", value)
    with pytest.raises(hdr.UnsafeHeader):
        hdr.upstream_request_head(
            [], keep_authorization=False, client_ip=None, scheme="http", host=value
        )


def test_the_request_block_rewrites_forwarding_headers_and_keeps_the_rest() -> None:
    block = hdr.upstream_request_head(
        [
            (b"Accept", b"text/csv"),
            (b"Connection", b"keep-alive, X-Drop-Me"),
            (b"X-Drop-Me", b"1"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"Via", b"1.0 edge"),
            (b"Content-Length", b"5"),
            (b"Authorization", b"Bearer t"),
            (b"X_Metergate_Account", b"spoof"),
        ],
        keep_authorization=False,
        client_ip=b"10.0.0.1",
        scheme="http",
        host="gw",
        added=hdr.header_line(b"X-Metergate-Account", "acct"),
    )
    assert block == (
        b"Accept: text/csv\r\n"
        b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: gw\r\n"
        b"Via: 1.0 edge, 1.1 metergate\r\n"
        b"X-Metergate-Account: acct\r\n"
    )


def test_headers_named_in_connection_are_dropped_wherever_they_come() -> None:
    raw = [
        (b"X-Before", b"1"),
        (b"Connection", b"X-Before, x-after"),
        (b"Accept", b"*/*"),
        (b"X-After", b"2"),
    ]
    block = hdr.upstream_request_head(
        raw, keep_authorization=True, client_ip=None, scheme="https", host=None
    )
    assert block == b"Accept: */*\r\nX-Forwarded-Proto: https\r\nVia: 1.1 metergate\r\n"
    back = hdr.client_response_head([*raw, (b"Via", b"1.0 origin")])
    assert back.startswith(b"Accept: */*\r\nVia: 1.0 origin, 1.1 metergate\r\nDate: ")


@pytest.mark.parametrize("value", [b"close", b"keep-alive", b"Keep-Alive, close", b" close ,"])
def test_the_usual_connection_options_leave_the_other_fields_as_they_are(value: bytes) -> None:
    # What most clients and servers send on every message: nothing more to drop (one pass),
    # unless a field bears an option's name (the reserved Close), which then goes too.
    rest = [(b"Accept", b"*/*"), (b"X-Trace", b"7"), (b"Keep-Alive", b"timeout=5")]
    with_it = [(b"Connection", value), *rest]

    def upstream(fields: list[tuple[bytes, bytes]]) -> bytes:
        return hdr.upstream_request_head(
            fields, keep_authorization=False, client_ip=None, scheme="http", host=None
        )

    def back(fields: list[tuple[bytes, bytes]]) -> bytes:
        return b"".join(
            line
            for line in hdr.client_response_head(fields).splitlines(True)
            if not line.startswith(b"Date: ")
        )

    assert (
        upstream(with_it)
        == upstream(rest)
        == b"Accept: */*\r\nX-Trace: 7\r\n" + (b"X-Forwarded-Proto: http\r\nVia: 1.1 metergate\r\n")
    )
    assert back(with_it) == back(rest) == b"Accept: */*\r\nX-Trace: 7\r\nVia: 1.1 metergate\r\n"
    if b"close" in value:
        assert b"Close" not in upstream([*with_it, (b"Close", b"1")])
        assert b"Close" not in back([*with_it, (b"Close", b"1")])


def test_the_response_block_drops_framing_and_hop_by_hop_and_adds_via_and_date() -> None:
    block = hdr.client_response_head(
        [
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"2"),
            (b"Connection", b"X-Internal"),
            (b"X-Internal", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
        ],
        b"RateLimit: x\r\n",
    )
    lines = block.split(b"\r\n")
    assert lines[0] == b"Content-Type: application/json"
    assert lines[1] == b"Via: 1.1 metergate"
    assert lines[2].startswith(b"Date: ")
    assert lines[3:] == [b"RateLimit: x", b""]
    dated = hdr.client_response_head([(b"Date", b"Tue, 01 Dec 2026 00:00:00 GMT")])
    assert dated.count(b"Date: ") == 1


def test_a_date_named_in_connection_is_replaced_by_the_gateways() -> None:
    block = hdr.client_response_head(
        [(b"Date", b"Tue, 01 Dec 2026 00:00:00 GMT"), (b"Connection", b"date")]
    )
    assert b"Tue, 01 Dec 2026" not in block
    assert block.count(b"Date: ") == 1


def test_replaced_names_leave_only_the_added_lines() -> None:
    block = hdr.client_response_head(
        [(b"RateLimit", b"backend"), (b"ratelimit-policy", b"backend")],
        b"RateLimit: gateway\r\n",
        replace=frozenset({b"ratelimit", b"ratelimit-policy"}),
    )
    assert b"backend" not in block
    assert block.endswith(b"RateLimit: gateway\r\n")


def test_hops_named_in_connection_or_without_a_client_address_are_not_forwarded() -> None:
    # Connection may name X-Forwarded-For or Via: the earlier hops go, ours stays; and
    # with no client address the client's own X-Forwarded-For is not passed on as ours.
    raw = [(b"Connection", b"X-Forwarded-For, Via"), (b"X-Forwarded-For", b"6.6.6.6")]
    raw += [(b"Via", b"1.0 evil")]
    block = hdr.upstream_request_head(
        raw, keep_authorization=False, client_ip=b"10.0.0.1", scheme="http", host=None
    )
    assert b"6.6.6.6" not in block
    assert b"evil" not in block
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in block
    alone = hdr.upstream_request_head(
        [(b"X-Forwarded-For", b"6.6.6.6")],
        keep_authorization=False,
        client_ip=None,
        scheme="http",
        host=None,
    )
    assert b"X-Forwarded-For" not in alone
