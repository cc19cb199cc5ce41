"""The route table prices canonical paths; patterns are parsed and checked for overlap."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from config import Config, parse_config
from config.paths import PatternError, parse_pattern
from gateway.routing import MethodNotAllowed, PricedRoute, RouteTable
from tests.conftest import auth, echo

BASE = """
[upstreams.default]
url = "http://127.0.0.1:9000"
[upstreams.admin]
url = "http://127.0.0.1:8081"
[tiers.free]
monthly_price_usd = 0
included_units = 100
[tiers.pro]
monthly_price_usd = 99
included_units = 10000
overage_unit_price_usd = 0.02
"""


def _config(routes: str) -> Config:
    return parse_config(BASE + routes)


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable(
        _config(
            """
[[routes]]
path = "/signals"
cost = 1
[[routes]]
path = "/signals"
methods = ["POST", "PUT"]
cost = 7
[[routes]]
path = "/signals/history/{symbol}"
cost = 2
[[routes]]
path = "/signals/history/{symbol}"
methods = ["DELETE"]
cost = 9
[[routes]]
path = "/signals/{symbol}/quotes/{day}"
cost = 4
tiers = ["pro"]
[[routes]]
path = "/billing/{rest...}"
methods = ["GET", "POST"]
upstream = "admin"
[[routes]]
path = "/pricing"
upstream = "admin"
public = true
[[routes]]
path = "/"
cost = 0
"""
        )
    )


def _route(result: PricedRoute | MethodNotAllowed | None) -> PricedRoute:
    assert isinstance(result, PricedRoute), result
    return result


@pytest.mark.parametrize(
    ("method", "path", "name", "cost"),
    [
        ("GET", "/signals", "/signals", 1),
        ("POST", "/signals", "/signals", 7),
        ("PUT", "/signals", "/signals", 7),
        ("GET", "/signals/history/AAPL", "/signals/history/{symbol}", 2),
        ("DELETE", "/signals/history/AAPL", "/signals/history/{symbol}", 9),
        ("GET", "/signals/history/%C3%A9", "/signals/history/{symbol}", 2),
        ("GET", "/signals/AAPL/quotes/2026-01-02", "/signals/{symbol}/quotes/{day}", 4),
        ("GET", "/billing/usage", "/billing/{rest...}", 0),
        ("POST", "/billing/checkout/session/123", "/billing/{rest...}", 0),
        ("GET", "/pricing", "/pricing", 0),
        ("GET", "/", "/", 0),
    ],
)
def test_match_prices_the_route(
    table: RouteTable, method: str, path: str, name: str, cost: int
) -> None:
    route = _route(table.match(method, path))
    assert (route.name, route.cost) == (name, cost)


def test_route_carries_upstream_visibility_and_tiers(table: RouteTable) -> None:
    billing = _route(table.match("GET", "/billing/x"))
    assert billing.upstream_name == "admin"
    assert billing.upstream.url == "http://127.0.0.1:8081"
    assert not billing.public
    assert _route(table.match("GET", "/pricing")).public
    assert _route(table.match("GET", "/signals/A/quotes/B")).tiers == ("pro",)
    assert _route(table.match("GET", "/signals")).tiers is None


@pytest.mark.parametrize(
    "path",
    [
        "/signal",
        "/signals/",
        "/signals/history",
        "/signals/history/",
        "/signals/history/AAPL/",
        "/signals/history/AAPL/extra",
        "/SIGNALS",
        "/billing",
        "/billing/",
        "/pricing/x",
        "/signals/AAPL/quotes",
    ],
)
def test_unmatched_paths(table: RouteTable, path: str) -> None:
    assert table.match("GET", path) is None


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/signals", ("GET", "POST", "PUT")),
        ("PATCH", "/signals/history/AAPL", ("DELETE", "GET")),
        ("DELETE", "/billing/x", ("GET", "POST")),
        ("POST", "/pricing", ("GET",)),
        ("get", "/signals", ("GET", "POST", "PUT")),
    ],
)
def test_wrong_method_lists_the_allowed_ones(
    table: RouteTable, method: str, path: str, allowed: tuple[str, ...]
) -> None:
    assert table.match(method, path) == MethodNotAllowed(allowed)


def test_static_route_shares_a_path_shape_with_a_pattern_for_other_methods() -> None:
    table = RouteTable(
        _config(
            """
[[routes]]
path = "/signals/history/latest"
methods = ["POST"]
cost = 3
[[routes]]
path = "/signals/history/{symbol}"
cost = 2
"""
        )
    )
    assert _route(table.match("POST", "/signals/history/latest")).cost == 3
    assert _route(table.match("GET", "/signals/history/latest")).cost == 2
    assert table.match("PUT", "/signals/history/latest") == MethodNotAllowed(("GET", "POST"))


def test_routes_lists_each_route_once(table: RouteTable) -> None:
    names = sorted(r.name for r in table.routes)
    assert len(names) == 8
    assert names.count("/signals") == 2


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("/signals", "/signals", True),
        ("/signals", "/export", False),
        ("/signals/{a}", "/signals/latest", True),
        ("/signals/{a}", "/signals/{b}", True),
        ("/signals/{a}", "/signals", False),
        ("/signals/{a}", "/signals/{a}/x", False),
        ("/{a}/history", "/signals/{b}", True),
        ("/{a}/history", "/signals/quotes", False),
        ("/billing/{rest...}", "/billing", False),
        ("/billing/{rest...}", "/billing/x", True),
        ("/billing/{rest...}", "/billing/x/y/z", True),
        ("/billing/{rest...}", "/billing/{id}/refund", True),
        ("/billing/{rest...}", "/{any...}", True),
        ("/billing/{rest...}", "/pricing/{rest...}", False),
        ("/a/b/{rest...}", "/a/{x}", False),
        ("/a/{x}/{rest...}", "/a/b/c", True),
        ("/", "/", True),
        ("/", "/signals", False),
        ("/", "/{rest...}", False),
    ],
)
def test_overlaps(a: str, b: str, overlap: bool) -> None:
    pa, pb = parse_pattern(a), parse_pattern(b)
    assert pa.overlaps(pb) is overlap
    assert pb.overlaps(pa) is overlap


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("/signals", ["/signals"], ["/signals/", "/signalsx", "/Signals"]),
        ("/h/{s}", ["/h/a", "/h/a.b", "/h/%C3%A9"], ["/h/", "/h/a/b", "/h"]),
        ("/b/{rest...}", ["/b/a", "/b/a/b/c"], ["/b", "/b/"]),
        ("/a.b/{x}", ["/a.b/1"], ["/aXb/1"]),
    ],
)
def test_pattern_regex(pattern: str, matches: list[str], misses: list[str]) -> None:
    regex = parse_pattern(pattern).regex()
    assert all(regex.fullmatch(p) for p in matches)
    assert not any(regex.fullmatch(p) for p in misses)


@pytest.mark.parametrize(
    "text",
    [
        "signals",
        "",
        "/signals/",
        "//signals",
        "/signals//x",
        "/signals/./x",
        "/signals/..",
        "/{rest...}/x",
        "/{a}/{a}",
        "/{1a}",
        "/{a b}",
        "/sig{a}",
        "/signals;x",
        "/signals%2F",
        "/signals/é",
        "/signals x",
    ],
)
def test_bad_patterns(text: str) -> None:
    with pytest.raises(PatternError):
        parse_pattern(text)


def test_static_and_tail_flags() -> None:
    assert parse_pattern("/signals/history").is_static
    assert not parse_pattern("/signals/{s}").is_static
    assert parse_pattern("/").is_static
    tail = parse_pattern("/billing/{rest...}").segments[-1]
    assert tail.literal is None and tail.tail


TIERED = """
[[routes]]
path = "/export/pdf"
cost = 5
tiers = ["pro"]
[[routes]]
path = "/export/preview"
cost = 0
tiers = ["pro"]
"""


async def _tiered_status(start_upstream, start_gateway, path: str) -> tuple[int, list[str]]:
    seen: list[str] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return await echo(request)

    upstream = await start_upstream({"/{tail:.*}": record})
    config = parse_config(BASE + TIERED, default_upstream_url=str(upstream.make_url("")))
    gateway = await start_gateway(config)
    async with aiohttp.ClientSession() as session:
        # An account without a plan is on the free tier.
        async with session.get(gateway.make_url(path), headers=auth("acct-free")) as resp:
            return resp.status, seen


async def test_tier_restricted_route_refuses_other_tiers(start_upstream, start_gateway) -> None:
    status, seen = await _tiered_status(start_upstream, start_gateway, "/export/pdf")
    assert status == 403
    assert seen == []


async def test_tier_restriction_holds_on_a_free_route(start_upstream, start_gateway) -> None:
    status, seen = await _tiered_status(start_upstream, start_gateway, "/export/preview")
    assert status == 403
    assert seen == []
