"""A bad gateway.toml is refused in one line that names the key; the shipped one loads."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from config import ConfigError, load_config, parse_config
from tests.conftest import ROOT

BAD = Path(__file__).parent / "bad"

# Each file under bad/ breaks one rule; the error must name this key.
EXPECTED = {
    "bad_balance": "gateway.balance",
    "bad_listen": "gateway.listen",
    "bad_refund_status": "metering.refund_statuses",
    "bad_route_path": "routes[2].path",
    "bad_tier_price": "tiers.gold.monthly_price_usd",
    "bad_upstream_ipv6": "upstreams.default.url",
    "bad_upstream_port": "upstreams.exports.url",
    "bad_upstream_url": "upstreams.default.url",
    "cost_beyond_lua": "routes[2].cost",
    "cost_huge": "routes[2].cost",
    "cost_not_a_number": "routes[2].cost",
    "duplicate_refund_status": "metering.refund_statuses",
    "duplicate_route": "routes[3].path",
    "empty_tiers": "routes[2].tiers",
    "route_body_over_limit": "routes[2].max_body_bytes",
    "free_tier_overage": "tiers.free.overage_unit_price_usd",
    "included_units_huge": "tiers.pro.included_units",
    "leeway_huge": "auth.leeway_seconds",
    "listen_bad_ip": "gateway.listen",
    "missing_default_upstream": "upstreams.default",
    "missing_free_tier": "tiers.free",
    "missing_public_key_file": "auth.public_key_file",
    "mixed_algorithms": "auth.algorithms",
    "negative_cost": "routes[2].cost",
    "newline_in_key": "unknown key",
    "not_toml": "not valid TOML",
    "not_utf8": "not valid TOML",
    "overage_price_inf": "tiers.pro.overage_unit_price_usd",
    "overlapping_route": "routes[3].path",
    "price_nan": "tiers.pro.monthly_price_usd",
    "public_route_cost": "routes[2].cost",
    "redis_timeout_huge": "metering.redis_timeout_seconds",
    "redis_timeout_inf": "metering.redis_timeout_seconds",
    "reserved_path": "routes[3].path",
    "unknown_algorithm": "auth.algorithms[1]",
    "unknown_key": "routes[2].prize",
    "unknown_section": "gatway",
    "unknown_tier": "routes[2].tiers",
    "unknown_upstream": "routes[2].upstream",
    "upstream_port_zero": "upstreams.exports.url",
    "upstream_timeout_inf": "upstreams.slow.timeout_seconds",
    "upstream_userinfo": "upstreams.exports.url",
}


def test_every_bad_file_has_an_expectation() -> None:
    assert sorted(p.stem for p in BAD.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_config_is_refused_in_one_line_naming_the_key(name: str) -> None:
    path = BAD / f"{name}.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: ")
    assert EXPECTED[name] in message


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("duplicate_route", "duplicates routes[1]"),
        ("overlapping_route", "overlaps routes[2]"),
        ("unknown_tier", "'gold'"),
        ("unknown_upstream", "'exports'"),
        ("negative_cost", ">= 0"),
        ("reserved_path", "/metrics"),
        ("route_body_over_limit", "over limits.max_request_body_bytes (1000)"),
    ],
)
def test_message_says_what_is_wrong(name: str, detail: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(BAD / f"{name}.toml")
    assert detail in str(caught.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_shipped_config_carries_the_product_pricing() -> None:
    config = load_config(ROOT / "gateway.toml")
    tiers = {
        name: (t.monthly_price_usd, t.included_units, t.overage_unit_price_usd)
        for name, t in config.tiers.items()
    }
    assert tiers == {
        "free": (0, 100, None),
        "starter": (29, 1000, Decimal("0.03")),
        "pro": (99, 10_000, Decimal("0.02")),
        "enterprise": (499, 100_000, Decimal("0.01")),
    }
    assert not config.free_tier.allows_overage
    costs = {r.path: (r.methods, r.cost, r.upstream) for r in config.routes if r.cost}
    assert costs == {
        "/signals": (("GET",), 1, "default"),
        "/signals/history/{symbol}": (("GET",), 2, "default"),
        "/export/csv": (("GET",), 3, "default"),
        "/export/pdf": (("GET",), 5, "default"),
    }
    admin = {r.path for r in config.routes if r.upstream == "admin"}
    assert {"/billing/{rest...}", "/pricing", "/webhooks/stripe"} <= admin
    assert config.auth.algorithms == ("HS256",)


def test_default_upstream_url_overrides_the_file() -> None:
    config = load_config(ROOT / "gateway.toml", default_upstream_url="http://10.0.0.7:9100")
    assert config.upstreams["default"].url == "http://10.0.0.7:9100"
    # Only the URL changes: the file's other upstream settings stay.
    assert config.upstreams["default"].timeout_seconds == 30
    assert config.upstreams["admin"].url == "http://127.0.0.1:8081"


MINIMAL = """
[upstreams.default]
url = "http://127.0.0.1:9000"
[tiers.free]
monthly_price_usd = 0
included_units = 100
"""


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[[routes]]\npath = "/p"\npublic = true\ntiers = ["free"]', "routes[1].tiers"),
        ('[[routes]]\npath = "/p"\nmethods = ["GET", "GET"]', "routes[1].methods"),
        ('[[routes]]\npath = "/p"\nmethods = []', "routes[1].methods"),
        ('[[routes]]\npath = "/p"\nmethods = ["TRACE"]', "routes[1].methods[1]"),
        ('[[routes]]\npath = "/p/{a}/{a}"', "routes[1].path"),
        ('[[routes]]\npath = "/p;x"', "routes[1].path"),
        ("[tiers.Gold]\nmonthly_price_usd = 1\nincluded_units = 1", "tiers.Gold"),
        ("[tiers.x]\nmonthly_price_usd = -1\nincluded_units = 1", "tiers.x.monthly_price_usd"),
        ("[tiers.x]\nmonthly_price_usd = 1\nincluded_units = 1\nmax_overage_units = 5", "tiers.x"),
        ('[upstreams.x]\nurl = "ftp://host"', "upstreams.x.url"),
        ('[upstreams.x]\nurl = "http://host/?q=1"', "upstreams.x.url"),
        ('[upstreams.x]\nurl = "http://host"\ntimeout_seconds = 0', "upstreams.x.timeout_seconds"),
        ('[admin]\nlisten = "127.0.0.1:99999"', "admin.listen"),
        ("[gateway]\nworkers = -1", "gateway.workers"),
        ("[auth]\nalgorithms = []", "auth.algorithms"),
        ('[auth]\nalgorithms = ["RS256"]', "auth"),
        ('[auth]\nalgorithms = ["RS256"]\njwks_url = "not a url"', "auth.jwks_url"),
        ('[auth]\njwks_url = "https://idp.test/jwks"', "auth"),
        ("[auth]\nleeway_seconds = -1", "auth.leeway_seconds"),
        (
            "[tiers.x]\nmonthly_price_usd = 1\nincluded_units = 1\nrequests_per_second = 2e6",
            "tiers.x.requests_per_second",
        ),
        ("[tiers.x]\nmonthly_price_usd = 1\nincluded_units = 1\nburst = 2000000", "tiers.x.burst"),
        ("[auth]\ntoken_cache_size = 100000000", "auth.token_cache_size"),
        ("[auth]\njwks_cache_seconds = inf", "auth.jwks_cache_seconds"),
        ('[auth]\nalgorithms = ["RS256"]\njwks_url = "https://u:p@idp.test/j"', "auth.jwks_url"),
        ("[billing]\ndaily_usage_ttl_seconds = 4294967296", "billing.daily_usage_ttl_seconds"),
        (
            '[upstreams.x]\nurl = "http://h"\nmax_connections = 100000',
            "upstreams.x.max_connections",
        ),
        ('[admin]\nlisten = "[127.0.0.1]:8081"', "admin.listen"),
        ('[admin]\nlisten = "bad_host:8081"', "admin.listen"),
        ('[gateway]\nmetrics_listen = "9464"', "gateway.metrics_listen"),
    ],
)
def test_cross_field_rules(extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + extra, source="t.toml")
    message = str(caught.value)
    assert message.startswith(f"t.toml: {key}")
    assert "\n" not in message


def _pem_files(tmp_path: Path) -> dict[str, Path]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    files = {
        "rsa_public": rsa_key.public_key().public_bytes(serialization.Encoding.PEM, public),
        "ec_public": ec_key.public_key().public_bytes(serialization.Encoding.PEM, public),
        "rsa_private": rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "garbage": b"not a key",
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.pem"
        out[name].write_bytes(data)
    return out


def test_public_key_file_must_be_a_public_key_of_the_configured_kind(tmp_path: Path) -> None:
    pems = _pem_files(tmp_path)

    def auth(algorithms: str, name: str) -> str:
        return f'[auth]\nalgorithms = {algorithms}\npublic_key_file = "{pems[name]}"\n'

    assert parse_config(MINIMAL + auth('["RS256", "PS256"]', "rsa_public")).auth.public_key_file
    assert parse_config(MINIMAL + auth('["ES256"]', "ec_public")).auth.public_key_file
    for algorithms, name, detail in [
        ('["RS256"]', "rsa_private", "private key"),
        ('["ES256"]', "rsa_public", "not a public key for ES256"),
        ('["RS256", "ES256"]', "rsa_public", "not a public key for ES256"),
        ('["RS256"]', "garbage", "not a public key for RS256"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(MINIMAL + auth(algorithms, name))
        message = str(caught.value)
        assert "auth.public_key_file" in message and detail in message
        assert "\n" not in message
