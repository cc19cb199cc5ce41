"""Deployment settings come from the environment and override the file's defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config import ConfigError, load_settings
from config.settings import DEV_JWT_SECRET
from gateway.embedded_redis import self_signed_tls
from tests.conftest import ROOT

SHIPPED = str(ROOT / "gateway.toml")
SECRET = "s" * 32


def _env(**overrides: str) -> dict[str, str]:
    return {"METERGATE_CONFIG": SHIPPED, **overrides}


def test_defaults_come_from_the_file() -> None:
    settings = load_settings(env=_env(METERGATE_JWT_SECRET=SECRET))
    assert settings.config_path == SHIPPED
    assert (settings.gateway_host, settings.gateway_port) == ("127.0.0.1", 8080)
    assert (settings.admin_host, settings.admin_port) == ("127.0.0.1", 8081)
    assert settings.workers == 1
    assert settings.redis_url is None
    assert settings.config.upstreams["default"].url == "http://127.0.0.1:9000"
    assert settings.jwt_secret == SECRET
    assert not settings.dev_secret


def test_config_path_from_environment(tmp_path: Path) -> None:
    text = Path(SHIPPED).read_text().replace("workers = 1", "workers = 3")
    (tmp_path / "other.toml").write_text(text)
    settings = load_settings(env={"METERGATE_CONFIG": str(tmp_path / "other.toml")})
    assert settings.workers == 3
    assert settings.config_path == str(tmp_path / "other.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={"METERGATE_CONFIG": str(tmp_path / "missing.toml")})


def test_config_path_defaults_to_gateway_toml_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^gateway\.toml: cannot read"):
        load_settings(env={})
    (tmp_path / "gateway.toml").write_text(Path(SHIPPED).read_text())
    assert load_settings(env={}).config_path == "gateway.toml"


def test_unset_secret_means_the_loud_dev_secret() -> None:
    for env in (_env(), _env(METERGATE_JWT_SECRET="")):
        settings = load_settings(env=env)
        assert settings.jwt_secret == DEV_JWT_SECRET
        assert settings.dev_secret


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="METERGATE_JWT_SECRET: HS256 needs at least 32"):
        load_settings(env=_env(METERGATE_JWT_SECRET="s" * 31))


@pytest.mark.parametrize(
    "url",
    [
        "redis://10.0.0.5:6379/2",
        "rediss://user:pw@redis.internal:6380/0",
        "unix:///r.sock",
        "unix:///r.sock?db=3",
        "redis://[::1]:6379",
        "redis+cluster://10.0.0.5:7000",
        "rediss+cluster://10.0.0.5:7000/0",
    ],
)
def test_redis_url(url: str) -> None:
    assert load_settings(env=_env(METERGATE_REDIS_URL=url)).redis_url == url


def test_a_tls_url_with_its_ca_and_client_certificate(tmp_path: Path) -> None:
    tls = self_signed_tls(tmp_path)
    url = (
        f"rediss://10.0.0.5:6380/0?ssl_ca_certs={tls.ca}&ssl_cert_reqs=required"
        f"&ssl_certfile={tls.cert}&ssl_keyfile={tls.key}"
    )
    assert load_settings(env=_env(METERGATE_REDIS_URL=url)).redis_url == url
    mismatched = url.replace(f"ssl_certfile={tls.cert}", f"ssl_certfile={tls.ca}")
    with pytest.raises(ConfigError, match=r"METERGATE_REDIS_URL: TLS: .*KEY_VALUES_MISMATCH"):
        load_settings(env=_env(METERGATE_REDIS_URL=mismatched))


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("http://localhost:6379", "expected redis://"),
        ("redis://127.0.0.1:notaport/0", "bad URL"),
        ("redis://127.0.0.1:70000/0", "bad URL"),
        ("redis://127.0.0.1:0/0", "port 0"),
        ("redis://:pw@[::1", "Invalid IPv6 URL"),
        ("redis://", "needs a host"),
        ("rediss://:6379/0", "needs a host"),
        ("unix://", "needs a socket path"),
        ("redis://host/abc", "database 'abc' is not a number"),
        ("unix:///r.sock?db=x", "database 'x' is not a number"),
        ("redis+cluster://127.0.0.1:7000/1", "only database 0"),
        ("redis+cluster://127.0.0.1:7000?db=2", "only database 0"),
        ("rediss://h:6380/0?ssl_ca_certs=/no/ca.pem", "ssl_ca_certs: no such file /no/ca.pem"),
        ("rediss://h:6380/0?ssl_certfile=/no/c.pem", "ssl_certfile: no such file /no/c.pem"),
        ("rediss://h:6380/0?ssl_keyfile=/no/k.pem", "ssl_keyfile: no such file /no/k.pem"),
        ("rediss://:pw@h:6380/0?ssl_cert_reqs=yes", "ssl_cert_reqs: expected none, optional"),
        ("redis://:pw@h:6379/0?ssl_ca_certs=/etc/hosts", "ssl_ca_certs needs a rediss:// URL"),
        ("rediss://h:6380/0?ssl_keyfile=/etc/hosts", "ssl_keyfile needs ssl_certfile"),
        ("rediss://h:6380/0?ssl_ca_cert=/etc/hosts", "unknown option ssl_ca_cert"),
        ("redis://:pw@h:6379/0?sockettimeout=1", "unknown option sockettimeout"),
        ("rediss://h:6380/0?ssl_ca_certs=/etc/hosts", "TLS: [X509: NO_CERTIFICATE_OR_CRL_FOUND]"),
        ("rediss://h:6380/0?ssl_min_version=abc", "Invalid value for 'ssl_min_version'"),
    ],
)
def test_bad_redis_url(url: str, detail: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=_env(METERGATE_REDIS_URL=url))
    message = str(caught.value)
    assert message.startswith("METERGATE_REDIS_URL: ") and detail in message
    assert "pw" not in message  # the URL may carry a password: never echo it


def test_upstream_url_overrides_the_default_upstream_only() -> None:
    settings = load_settings(env=_env(METERGATE_UPSTREAM_URL="http://backend.internal:9100"))
    assert settings.config.upstreams["default"].url == "http://backend.internal:9100"
    assert settings.config.upstreams["admin"].url == "http://127.0.0.1:8081"


@pytest.mark.parametrize(
    "url",
    [
        "backend:9000",
        "ftp://backend",
        "http://",
        "http://b:x",
        "http://[::1",
        "http://b:0",
        "http://u:p@b",
    ],
)
def test_bad_upstream_url(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^METERGATE_UPSTREAM_URL: "):
        load_settings(env=_env(METERGATE_UPSTREAM_URL=url))


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("0.0.0.0:9090", "0.0.0.0", 9090),
        ("[::1]:8443", "::1", 8443),
        ("localhost:0", "localhost", 0),
    ],
)
def test_listen_addresses(value: str, host: str, port: int) -> None:
    settings = load_settings(
        env=_env(METERGATE_GATEWAY_LISTEN=value, METERGATE_ADMIN_LISTEN=f"{host}:{port + 1}")
    )
    assert (settings.gateway_host, settings.gateway_port) == (host, port)
    assert (settings.admin_host, settings.admin_port) == (host, port + 1)


def test_metrics_listen_from_the_file_or_the_environment(tmp_path: Path) -> None:
    assert load_settings(env=_env()).metrics_host is None  # shipped: on the gateway's port
    text = (
        Path(SHIPPED)
        .read_text()
        .replace("[gateway]\n", '[gateway]\nmetrics_listen = "127.0.0.1:9464"\n', 1)
    )
    (tmp_path / "m.toml").write_text(text)
    settings = load_settings(env={"METERGATE_CONFIG": str(tmp_path / "m.toml")})
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9464)
    settings = load_settings(env=_env(METERGATE_GATEWAY_METRICS_LISTEN="0.0.0.0:9100"))
    assert (settings.metrics_host, settings.metrics_port) == ("0.0.0.0", 9100)


@pytest.mark.parametrize("value", ["127.0.0.1:8080", "localhost:8080", "0.0.0.0:8080"])
def test_metrics_listen_on_the_gateway_port_is_refused(value: str, tmp_path: Path) -> None:
    var = "METERGATE_GATEWAY_METRICS_LISTEN"
    with pytest.raises(ConfigError) as caught:
        load_settings(env=_env(**{var: value}))
    assert str(caught.value).startswith(f"{var}: port 8080 is the gateway's")
    text = (
        Path(SHIPPED)
        .read_text()
        .replace("[gateway]\n", f'[gateway]\nmetrics_listen = "{value}"\n', 1)
    )
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"METERGATE_CONFIG": str(tmp_path / "m.toml")})
    assert str(caught.value).startswith("gateway.metrics_listen: port 8080 is the gateway's")


def test_metrics_listen_needs_a_fixed_port() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=_env(METERGATE_GATEWAY_METRICS_LISTEN="127.0.0.1:0"))
    assert str(caught.value) == "METERGATE_GATEWAY_METRICS_LISTEN: a fixed port is needed (not 0)"


@pytest.mark.parametrize(
    "var",
    ["METERGATE_GATEWAY_LISTEN", "METERGATE_ADMIN_LISTEN", "METERGATE_GATEWAY_METRICS_LISTEN"],
)
@pytest.mark.parametrize(
    "value",
    [
        "8080",
        ":8080",
        "host:",
        "host:99999",
        "host:http",
        "h:\uff18\uff10",
        "999.1.1.1:80",
        "[h]:80",
    ],
)
def test_bad_listen_address(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env=_env(**{var: value}))
    assert str(caught.value).startswith(f"{var}: ")


@pytest.mark.parametrize(("value", "workers"), [("4", 4), ("1", 1), ("0", os.cpu_count() or 1)])
def test_workers(value: str, workers: int) -> None:
    assert load_settings(env=_env(METERGATE_GATEWAY_WORKERS=value)).workers == workers


@pytest.mark.parametrize("value", ["-1", "two", "1.5", " 2", "²", "٣"])
def test_bad_workers(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^METERGATE_GATEWAY_WORKERS: "):
        load_settings(env=_env(METERGATE_GATEWAY_WORKERS=value))


def test_workers_zero_in_the_file_means_one_per_cpu(tmp_path: Path) -> None:
    text = Path(SHIPPED).read_text().replace("workers = 1", "workers = 0")
    (tmp_path / "g.toml").write_text(text)
    assert load_settings(env={"METERGATE_CONFIG": str(tmp_path / "g.toml")}).workers == (
        os.cpu_count() or 1
    )
