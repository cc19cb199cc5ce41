"""`metergate check` and `metergate token` as an operator runs them: real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.conftest import ROOT

METERGATE = str(Path(sys.executable).with_name("metergate"))
BAD = ROOT / "tests" / "config" / "bad"
SECRET = "cli-secret-0123456789-0123456789-0123456789"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERGATE_")}
    env["METERGATE_CONFIG"] = str(ROOT / "gateway.toml")
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERGATE, *args], env=_env(**env), capture_output=True, text=True, timeout=30
    )


def test_check_accepts_the_shipped_config() -> None:
    result = _run("check", METERGATE_JWT_SECRET=SECRET)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert result.stderr == ""


def test_check_without_a_secret_warns_in_one_line() -> None:
    result = _run("check")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert result.stderr.splitlines() == [
        "metergate: warning: METERGATE_JWT_SECRET is not set: the fixed development "
        "secret would be used (anyone can mint tokens)"
    ]


# tests/config/test_load.py covers every file in-process; these are the ones whose
# failure comes from a different layer (TOML parser, UTF-8, msgspec, validation, files).
CLI_CASES = [
    "not_toml",
    "not_utf8",
    "newline_in_key",
    "unknown_key",
    "negative_cost",
    "overlapping_route",
    "missing_public_key_file",
    "bad_listen",
    "bad_upstream_ipv6",
    "price_nan",
]


def test_check_refuses_bad_files_in_one_line() -> None:
    files = [BAD / f"{name}.toml" for name in CLI_CASES]
    # In parallel: one interpreter start per file would otherwise dominate.
    procs = {
        path: subprocess.Popen(
            [METERGATE, "check"],
            env=_env(METERGATE_CONFIG=str(path)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in files
    }
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, (path, err)
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1, (path, err)
        assert lines[0].startswith(f"metergate: config error: {path}: ")
        assert "Traceback" not in err


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("METERGATE_GATEWAY_WORKERS", "²"),
        ("METERGATE_GATEWAY_LISTEN", "nowhere"),
        ("METERGATE_REDIS_URL", "localhost:6379"),
        ("METERGATE_REDIS_URL", "redis://:pw@[::1"),
        ("METERGATE_REDIS_URL", "redis://127.0.0.1:notaport/0"),
        ("METERGATE_UPSTREAM_URL", "backend:9000"),
        ("METERGATE_UPSTREAM_URL", "http://[::1"),
        ("METERGATE_CONFIG", "/nonexistent/gateway.toml"),
        ("METERGATE_LOG_LEVEL", "bogus"),
        ("METERGATE_LOG_LEVEL", "1nfo\nx"),
    ],
)
def test_check_refuses_a_bad_environment_in_one_line(var: str, value: str) -> None:
    result = _run("check", **{var: value})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("metergate: config error: ")
    assert var in result.stderr or value in result.stderr


def test_token_is_signed_with_the_configured_secret() -> None:
    result = _run(
        "token", "--sub", "acct-cli", "--admin", "--ttl", "120", METERGATE_JWT_SECRET=SECRET
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "acct-cli"
    assert claims["role"] == "admin"
    assert claims["exp"] - claims["iat"] == 120
    assert "development secret" not in result.stderr


def test_token_with_the_dev_secret_says_so() -> None:
    result = _run("token", "--sub", "acct-dev")
    assert result.returncode == 0
    assert "development secret" in result.stderr
    assert "role" not in jwt.decode(result.stdout.strip(), options={"verify_signature": False})
