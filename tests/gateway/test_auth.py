"""Every way a bearer token can be wrong gives 401 and never reaches the backend."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from config import Config
from config.load import validate
from config.model import Auth
from gateway.auth import TokenVerifier
from gateway.errors import AuthError
from tests.conftest import SECRET, Clock, echo, load_test_config, make_token, replace_section

Start = Callable[..., Awaitable[TestServer]]
INVALID = 'error="invalid_token"'


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(obj: dict[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "acct-1", "exp": int(time.time()) + 3600, **extra}


def alg_none_token(payload: dict[str, Any] | None = None) -> str:
    return f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(payload or _claims())}."


def hmac_by_hand(key: bytes, payload: dict[str, Any] | None = None, alg: str = "HS256") -> str:
    # PyJWT refuses to use a PEM public key as an HMAC secret, so sign the way an attacker would.
    digest = {"HS256": hashlib.sha256, "HS512": hashlib.sha512}[alg]
    signing_input = f"{_segment({'alg': alg, 'typ': 'JWT'})}.{_segment(payload or _claims())}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def _public_pem(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _with_auth(config: Config, **fields: Any) -> Config:
    config = replace_section(config, auth=fields)
    validate(config)  # the same rules a gateway.toml with these fields must pass
    return config


class Recorder:
    """An upstream that remembers every request it was asked to serve."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append((request.raw_path, dict(request.headers)))
        return await echo(request)


@pytest.fixture
async def backend(start_upstream: Start) -> tuple[Recorder, Config]:
    recorder = Recorder()
    upstream = await start_upstream({"/{tail:.*}": recorder.handle})
    return recorder, load_test_config(str(upstream.make_url("")))


async def _get(gateway: TestServer, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.make_url("/signals"), headers=headers) as resp:
            return resp.status, resp.headers, await resp.json()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_invalid(status: int, headers: Any, body: Any) -> None:
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert INVALID in challenge
    assert body["error"]["code"] == "invalid_token"
    assert body["error"]["message"]


BAD_HS256_HEADERS: dict[str, Callable[[], dict[str, str]]] = {
    "expired": lambda: _bearer(make_token(ttl=-3600)),
    "no_exp": lambda: _bearer(jwt.encode({"sub": "acct-1"}, SECRET, algorithm="HS256")),
    "no_sub": lambda: _bearer(make_token(None)),
    "empty_sub": lambda: _bearer(make_token("")),
    "numeric_sub": lambda: _bearer(jwt.encode(_claims(sub=42), SECRET, algorithm="HS256")),
    "bad_signature": lambda: _bearer(make_token(secret="another-secret-0123456789-0123456789")),
    "tampered_payload": lambda: _bearer(
        ".".join(
            [
                make_token().split(".")[0],
                _segment(_claims(sub="acct-rich")),
                make_token().split(".")[2],
            ]
        )
    ),
    "alg_none": lambda: _bearer(alg_none_token()),
    "alg_none_upper": lambda: _bearer(f"{_segment({'alg': 'None'})}.{_segment(_claims())}."),
    "hs512_not_configured": lambda: _bearer(hmac_by_hand(SECRET.encode(), alg="HS512")),
    "garbage": lambda: _bearer("garbage"),
    "three_garbage_parts": lambda: _bearer("a.b.c"),
    "not_base64": lambda: _bearer("!!!.???.***"),
    "empty_bearer": lambda: {"Authorization": "Bearer "},
    "basic_scheme": lambda: {"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"},
    "token_without_scheme": lambda: {"Authorization": make_token()},
}


@pytest.mark.parametrize("case", sorted(BAD_HS256_HEADERS))
async def test_bad_token_is_401_and_never_forwarded(
    case: str, backend: tuple[Recorder, Config], start_gateway: Start
) -> None:
    recorder, config = backend
    gateway = await start_gateway(config)
    _assert_invalid(*await _get(gateway, BAD_HS256_HEADERS[case]()))
    assert recorder.hits == []


async def test_missing_token_challenges_without_error_code(
    backend: tuple[Recorder, Config], start_gateway: Start
) -> None:
    recorder, config = backend
    gateway = await start_gateway(config)
    status, headers, body = await _get(gateway, {})
    assert status == 401
    # RFC 6750 3.1: no error attribute when the request carried no credentials at all.
    assert headers["WWW-Authenticate"] == 'Bearer realm="metergate"'
    assert body["error"]["code"] == "missing_token"
    assert recorder.hits == []


async def test_valid_token_is_forwarded_as_its_account(
    backend: tuple[Recorder, Config], start_gateway: Start
) -> None:
    recorder, config = backend
    gateway = await start_gateway(config)
    status, _, _ = await _get(gateway, _bearer(make_token("acct-ok")))
    assert status == 200
    [(path, headers)] = recorder.hits
    assert path == "/signals"
    assert headers["X-Metergate-Account"] == "acct-ok"
    assert "Authorization" not in headers
    assert "X-Metergate-Role" not in headers
    # The hand signer below is right: with the real secret its token is accepted.
    assert (await _get(gateway, _bearer(hmac_by_hand(SECRET.encode()))))[0] == 200


async def test_admin_role_claim_marks_the_operator_upstream(
    backend: tuple[Recorder, Config], start_gateway: Start
) -> None:
    recorder, config = backend
    gateway = await start_gateway(config)
    assert (await _get(gateway, _bearer(make_token("op", role="admin"))))[0] == 200
    assert (await _get(gateway, _bearer(make_token("user", role="user"))))[0] == 200
    # A client cannot claim the role with a header of its own.
    forged = {**_bearer(make_token("forger")), "X-Metergate-Role": "admin"}
    assert (await _get(gateway, forged))[0] == 200
    roles = [h.get("X-Metergate-Role") for _, h in recorder.hits]
    assert roles == ["admin", None, None]


@pytest.mark.parametrize(
    ("claims", "ok"),
    [
        ({"iss": "https://issuer.test/", "aud": "signals-api"}, True),
        ({"iss": "https://issuer.test/", "aud": ["other", "signals-api"]}, True),
        ({"iss": "https://evil.test/", "aud": "signals-api"}, False),
        ({"aud": "signals-api"}, False),
        ({"iss": "https://issuer.test/", "aud": "other-api"}, False),
        ({"iss": "https://issuer.test/"}, False),
    ],
    ids=["right", "aud_list", "wrong_iss", "no_iss", "wrong_aud", "no_aud"],
)
async def test_issuer_and_audience_are_checked_when_configured(
    claims: dict[str, Any], ok: bool, backend: tuple[Recorder, Config], start_gateway: Start
) -> None:
    recorder, config = backend
    config = _with_auth(config, issuer="https://issuer.test/", audience="signals-api")
    gateway = await start_gateway(config)
    result = await _get(gateway, _bearer(make_token(**claims)))
    if ok:
        assert result[0] == 200
        assert len(recorder.hits) == 1
    else:
        _assert_invalid(*result)
        assert recorder.hits == []


@pytest.mark.parametrize(("expired_ago", "ok"), [(10, True), (60, False)])
async def test_leeway_tolerates_small_clock_skew_only(
    expired_ago: int, ok: bool, backend: tuple[Recorder, Config], start_gateway: Start
) -> None:
    recorder, config = backend
    gateway = await start_gateway(_with_auth(config, leeway_seconds=30))
    result = await _get(gateway, _bearer(make_token(ttl=-expired_ago)))
    if ok:
        assert result[0] == 200
    else:
        _assert_invalid(*result)
        assert recorder.hits == []


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


async def _gateway_with_public_key_file(
    start_gateway: Start,
    config: Config,
    tmp_path: Path,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    algorithm: str,
) -> tuple[TestServer, bytes]:
    """A gateway that accepts only `algorithm`, verifying against key's public half read from
    a PEM file; the gateway and that PEM."""
    pem = _public_pem(key)
    key_file = _write(tmp_path / f"jwt-{algorithm}.pem", pem)
    gateway = await start_gateway(
        _with_auth(config, algorithms=(algorithm,), public_key_file=key_file)
    )
    return gateway, pem


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def test_rs256_with_public_key_file(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    backend: tuple[Recorder, Config],
    start_gateway: Start,
) -> None:
    recorder, config = backend
    gateway, pem = await _gateway_with_public_key_file(
        start_gateway, config, tmp_path, rsa_key, "RS256"
    )

    status, _, _ = await _get(gateway, _bearer(jwt.encode(_claims(), rsa_key, algorithm="RS256")))
    assert status == 200
    assert len(recorder.hits) == 1

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacks = {
        # HS/RS confusion: the public key is public, so it must never work as an HMAC secret.
        "hs256_with_public_pem": hmac_by_hand(pem),
        "hs256_with_public_pem_stripped": hmac_by_hand(pem.strip()),
        "alg_none": alg_none_token(),
        "other_rsa_key": jwt.encode(_claims(), stranger, algorithm="RS256"),
        "es256_token": jwt.encode(_claims(), ec_key, algorithm="ES256"),
        "hs256_with_shared_secret": make_token(),
        "expired": jwt.encode(_claims(exp=int(time.time()) - 3600), rsa_key, algorithm="RS256"),
    }
    for name, token in attacks.items():
        status, headers, body = await _get(gateway, _bearer(token))
        assert status == 401, name
        _assert_invalid(status, headers, body)
    assert len(recorder.hits) == 1


async def test_es256_with_public_key_file(
    ec_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    backend: tuple[Recorder, Config],
    start_gateway: Start,
) -> None:
    recorder, config = backend
    gateway, pem = await _gateway_with_public_key_file(
        start_gateway, config, tmp_path, ec_key, "ES256"
    )
    status, _, _ = await _get(gateway, _bearer(jwt.encode(_claims(), ec_key, algorithm="ES256")))
    assert status == 200
    _assert_invalid(*await _get(gateway, _bearer(hmac_by_hand(pem))))
    assert len(recorder.hits) == 1


async def test_cached_token_still_expires(
    backend: tuple[Recorder, Config], start_gateway: Start, clock: Clock
) -> None:
    recorder, config = backend
    gateway = await start_gateway(_with_auth(config, leeway_seconds=0))
    # PyJWT checks exp against real time and the cache against the injected clock, so the
    # token must really expire: a short one, and a short real wait.
    exp = math.ceil(time.time()) + 1
    token = jwt.encode({"sub": "acct-short", "exp": exp}, SECRET, algorithm="HS256")
    clock.now = exp - 1
    assert (await _get(gateway, _bearer(token)))[0] == 200
    while time.time() < exp + 0.05:
        await asyncio.sleep(0.05)
    # The gateway's clock says the token is still good: served from the cache.
    assert (await _get(gateway, _bearer(token)))[0] == 200
    clock.now = exp
    _assert_invalid(*await _get(gateway, _bearer(token)))
    assert len(recorder.hits) == 2


async def test_cached_answers_only_what_verify_header_would_from_its_cache() -> None:
    clock = Clock(time.time())
    verifier = TokenVerifier(Auth(leeway_seconds=0), secret=SECRET, clock=clock)
    token = make_token("acct-fast", ttl=60)
    assert verifier.cached(f"Bearer {token}") is None  # never verified: the slow path
    claims = await verifier.verify_header(f"Bearer {token}")
    assert claims.sub == "acct-fast"
    # The scheme in any case and spaces around the token, as verify_header takes them.
    for header in (f"Bearer {token}", f"bearer {token}", f"BEARER  {token} "):
        assert verifier.cached(header) == claims
    for header in (None, "", token, f"Basic {token}", f"Bearer{token}", "Bearer "):
        assert verifier.cached(header) is None
    clock.now = claims.exp
    assert verifier.cached(f"Bearer {token}") is None  # expired: left to verify_header


async def test_token_cache_is_bounded() -> None:
    clock = Clock(time.time())
    verifier = TokenVerifier(Auth(token_cache_size=2), secret=SECRET, clock=clock)
    tokens = [make_token(f"acct-{i}") for i in range(5)]
    for i, token in enumerate(tokens):
        assert (await verifier.verify(token)).sub == f"acct-{i}"
    assert len(verifier.tokens) == 2
    # The most recent tokens are the ones kept; the cache never grows past its bound.
    assert set(verifier.tokens) == set(tokens[-2:])
    for token in tokens:
        await verifier.verify(token)
        assert len(verifier.tokens) <= 2


async def test_token_cache_can_be_disabled() -> None:
    verifier = TokenVerifier(Auth(token_cache_size=0), secret=SECRET)
    await verifier.verify(make_token())
    assert len(verifier.tokens) == 0


async def test_verifier_maps_every_failure_to_auth_error() -> None:
    verifier = TokenVerifier(Auth(), secret=SECRET)
    with pytest.raises(AuthError) as missing:
        await verifier.verify_header(None)
    assert missing.value.missing
    for header in ("Bearer x", "Bearer " + alg_none_token(), "Token abc", "Bearer"):
        with pytest.raises(AuthError) as invalid:
            await verifier.verify_header(header)
        assert not invalid.value.missing
    claims = await verifier.verify_header("bearer " + make_token("acct-x", role="admin"))
    assert (claims.sub, claims.is_admin) == ("acct-x", True)


def _signed(header: Any, payload: Any) -> str:
    # Raw JSON segments (any shape), validly HMAC-signed with the gateway's secret.
    def seg(obj: Any) -> str:
        return obj if isinstance(obj, str) else _segment(obj)

    signing_input = f"{seg(header)}.{seg(payload)}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


HS = {"alg": "HS256", "typ": "JWT"}
ODD_TOKENS = {
    "header_is_a_list": _signed(_b64(b"[1,2]"), _claims()),
    "payload_is_a_list": _signed(HS, _b64(b'["sub"]')),
    "payload_not_json": _signed(HS, _b64(b"{nope")),
    "exp_is_a_string": _signed(HS, _claims(exp="tomorrow")),
    "exp_is_nan": _signed(HS, _b64(b'{"sub":"a","exp":NaN}')),
    "exp_is_infinite": _signed(HS, _b64(b'{"sub":"a","exp":Infinity}')),
    "exp_is_huge": _signed(HS, _claims(exp=10**400)),
    "sub_is_null": _signed(HS, _claims(sub=None)),
    "sub_too_long": _signed(HS, _claims(sub="a" * 129)),
    # Valid JSON, but no UTF-8 for a Redis key or a header: "\ud800" alone is no character.
    "sub_lone_surrogate": _signed(
        HS, _b64(b'{"sub":"acct-\\ud800","exp":%d}' % (int(time.time()) + 3600))
    ),
    "sub_control_character": _signed(HS, _claims(sub="acct-\x01")),
    "nbf_in_future": _signed(HS, _claims(nbf=int(time.time()) + 3600)),
    "iat_is_a_string": _signed(HS, _claims(iat="now")),
    "crit_header": _signed({**HS, "crit": ["exp"]}, _claims()),
    "four_parts": make_token() + ".x",
    "two_parts": ".".join(make_token().split(".")[:2]),
    "huge": "a" * 6000,
    "non_ascii": "é.é.é",
}


@pytest.mark.parametrize("name", sorted(ODD_TOKENS))
async def test_odd_signed_tokens_are_auth_errors_not_crashes(name: str) -> None:
    # Only AuthError may leave the verifier: anything else becomes a 500 in the proxy.
    verifier = TokenVerifier(Auth(), secret=SECRET)
    with pytest.raises(AuthError):
        await verifier.verify(ODD_TOKENS[name])


@pytest.mark.parametrize("path", ["/signals", "/pricing"])
async def test_more_than_one_authorization_header_is_401_and_never_forwarded(
    path: str, start_upstream: Start, start_gateway: Start
) -> None:
    # The gateway would charge one account while a backend reading the other serves it.
    recorder = Recorder()
    upstream = await start_upstream({"/{tail:.*}": recorder.handle})
    url = str(upstream.make_url(""))
    gateway = await start_gateway(load_test_config(url, admin_url=url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                f"Authorization: Bearer {make_token('acct-payer')}\r\n"
                f"Authorization: Bearer {make_token('acct-victim')}\r\n\r\n"
            ).encode()
        )
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert INVALID.encode() in head
    assert json.loads(body)["error"]["code"] == "invalid_token"
    assert recorder.hits == []
