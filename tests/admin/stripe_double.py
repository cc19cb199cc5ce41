"""A stateful Stripe API double, served by aiohttp on a loopback port, for the real stripe library.

Use it through the ``stripe_double`` fixture (tests/admin/conftest.py)::

    async def test_x(stripe_double: StripeDouble, redis_client):
        billing = StripeBilling(stripe_double.settings, redis_client)   # real StripeClient
        ...
        stripe_double.webhook_url = str(admin_server.make_url("/webhooks/stripe"))
        await stripe_double.deliver()            # send the events Stripe would have sent

``stripe_double`` is started with the catalogue of gateway.toml already in it (one product,
flat price and metered overage price per paid tier, one Billing Meter) and
``stripe_double.settings`` is a StripeSettings pointing at it with those price ids;
``bare_stripe_double`` starts empty (for ``metergate stripe-setup``).

What it implements, as stripe-python sends it (form bodies, ``expand[]``, Bearer key):
customers (create, retrieve, update, delete, list, search by ``metadata['k']:'v'``),
payment_methods (attach, detach, retrieve, list), subscriptions (create, retrieve, update
with items / proration_behavior / cancel_at_period_end, cancel, list), invoices (list,
retrieve), billing_portal sessions, products, prices (``lookup_keys``,
``transfer_lookup_key``), billing meters (list, create, retrieve), billing meter events
(``identifier`` dedupe), events (retrieve, list). Objects are Stripe's official examples
(fixtures3.json) with our values, at API version basil or later: periods on the items,
``invoice.parent.subscription_details.subscription``, ``confirmation_secret`` on request.

Behaviour switches:
- Idempotency-Key: the same key and parameters replay the first answer
  (``Idempotent-Replayed: true``), other parameters get 400 idempotency_error, a request
  while the first is still running gets 409 (use ``latency`` to make requests overlap).
- Test payment methods: ``pm_card_visa`` (and mastercard, amex) pay;
  ``pm_card_chargeDeclined`` fails to attach with a 402 card_error (decline_code
  generic_decline); ``pm_card_authenticationRequired`` leaves the subscription
  ``incomplete`` with an open invoice carrying a confirmation_secret (3-D Secure);
  ``pm_card_chargeCustomerFail`` attaches but its payments fail. Attaching a ``pm_card_*``
  token creates a new ``pm_...`` as Stripe does; ``add_payment_method()`` makes one as
  Stripe.js would.
- Outages: ``down = "500" | "close" | "hang"`` for every request, or ``fail_next(n, mode)``.
- Time: ``clock`` (a callable) gives ``created`` and the billing periods.

Webhooks, signed as Stripe signs them (``Stripe-Signature: t=<ts>,v1=<hmac>``): every state
change appends Stripe's event to ``outbox`` (and ``events``); ``deliver()`` posts the
outbox to ``webhook_url`` in order; ``send_event(ev, ...)`` posts one event (again, late,
with a bad or stale signature); ``emit(type, object_id)`` builds a fresh event for the
current state. Payment life-cycle helpers: ``confirm_payment`` (3-D Secure done),
``fail_payment`` (renewal failed → past_due), ``advance_period`` (renewal, or the end of
a subscription set to cancel at period end).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import msgspec
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from admin.stripe_settings import StripeSettings
from tests.admin import stripe_objects as so
from tests.admin.stripe_objects import Json, as_bool, as_list, new_id

Handler = Callable[[web.Request, Json], Awaitable[web.Response]]
API_VERSION = stripe.api_version


class StripeApiError(Exception):
    def __init__(self, status: int, body: Json) -> None:
        super().__init__(body["error"]["message"])
        self.status = status
        self.body = body


def _missing(kind: str, oid: str, param: str = "id") -> StripeApiError:
    return StripeApiError(
        404,
        so.error_body(
            "invalid_request_error",
            f"No such {kind}: '{oid}'",
            code="resource_missing",
            param=param,
        ),
    )


def _stored(objects: dict[str, Json], kind: str, request: web.Request) -> Json:
    """The object the request's path names, or Stripe's 404 when there is none."""
    oid = request.match_info["id"]
    obj = objects.get(oid)
    if obj is None:
        raise _missing(kind, oid)
    return obj


def _filter_active(found: list[Json], params: Json) -> list[Json]:
    """Stripe's ``active`` list filter: applied only when the request names it."""
    if "active" not in params:
        return found
    return [o for o in found if o["active"] == as_bool(params["active"])]


def _invalid(message: str, param: str | None = None) -> StripeApiError:
    return StripeApiError(
        400, so.error_body("invalid_request_error", message, code="parameter_invalid", param=param)
    )


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    """The Stripe-Signature header Stripe sends with a webhook."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class StripeDouble:
    def __init__(
        self,
        secret_key: str = "sk_test_double",
        webhook_secret: str = "whsec_double",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret_key = secret_key
        self.webhook_secret = webhook_secret
        self.clock = clock
        self.base_url = ""
        self.webhook_url: str | None = None
        self.settings = StripeSettings(secret_key=secret_key)  # complete after start()
        self.api_version = API_VERSION
        # Switches
        self.down: str | None = None
        # (method, path prefix, times): do the request, then lose its answer (the connection
        # breaks), as a timeout after Stripe acted would; every retry too, ``times`` in all.
        self.lose_answers: tuple[str, str, int] | None = None
        self.latency = 0.0
        self._fail_next = 0
        self._fail_mode = "500"
        self._released = asyncio.Event()
        # State
        self.customers: dict[str, Json] = {}
        self.payment_methods: dict[str, Json] = {}
        self.subscriptions: dict[str, Json] = {}
        self.invoices: dict[str, Json] = {}
        self.products: dict[str, Json] = {}
        self.prices: dict[str, Json] = {}
        self.meters: dict[str, Json] = {}
        self.meter_events: dict[str, Json] = {}  # identifier -> event (unique ones only)
        self.meter_event_requests = 0
        self.portal_sessions: dict[str, Json] = {}
        self.events: list[Json] = []
        self.outbox: list[Json] = []
        self.prorations: list[Json] = []
        self.requests: list[tuple[str, str, Json]] = []
        self.stripe_versions: set[str] = set()
        self._confirmation_secrets: dict[str, Json] = {}
        self._card_behaviour: dict[str, str] = {}
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}
        self._in_flight: set[str] = set()
        self._request_key: str | None = None
        self._server: TestServer | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        self._routes(app.router)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        self.base_url = str(self._server.make_url("")).rstrip("/")
        self._session = aiohttp.ClientSession()
        self.settings = self.make_settings()
        return self.base_url

    def make_settings(self, **changes: Any) -> StripeSettings:
        """StripeSettings for this double: short timeouts, a quick breaker, one retry."""
        settings = StripeSettings(
            secret_key=self.secret_key,
            publishable_key="pk_test_double",
            webhook_secret=self.webhook_secret,
            api_base=self.base_url,
            max_network_retries=1,
            timeout_seconds=2.0,
            circuit_failure_threshold=3,
            circuit_cooldown_seconds=1.0,
        )
        return msgspec.structs.replace(settings, **changes)

    async def close(self) -> None:
        self._released.set()
        if self._session is not None:
            await self._session.close()
        if self._server is not None:
            await self._server.close()

    def fail_next(self, n: int, mode: str = "500") -> None:
        """The next ``n`` requests fail as ``mode`` ("500", "close", "hang"), then all is well."""
        self._fail_next, self._fail_mode = n, mode

    def now(self) -> int:
        return int(self.clock())

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        mode = self.down
        if mode is None and self._fail_next > 0:
            self._fail_next -= 1
            mode = self._fail_mode
        if mode == "500":
            return web.json_response(
                so.error_body("api_error", "The double is down (simulated)."), status=500
            )
        if mode == "close":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if mode == "hang":
            await self._released.wait()
            return web.json_response(so.error_body("api_error", "released"), status=500)
        if request.headers.get("Authorization") != f"Bearer {self.secret_key}":
            return web.json_response(
                so.error_body("invalid_request_error", "Invalid API Key provided."), status=401
            )
        if version := request.headers.get("Stripe-Version"):
            self.stripe_versions.add(version)
        response = await handler(request)
        lose = self.lose_answers
        if lose and request.method == lose[0] and request.path.startswith(lose[1]) and lose[2]:
            self.lose_answers = (lose[0], lose[1], lose[2] - 1)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return response

    async def _dispatch(self, request: web.Request, handler: Handler) -> web.Response:
        if request.method == "POST":
            params = so.parse_form(list((await request.post()).items()))  # type: ignore[arg-type]
        else:
            params = so.parse_form(list(request.query.items()))
        self.requests.append((request.method, request.path, params))
        key = request.headers.get("Idempotency-Key")
        if key is None or request.method == "GET":
            return await self._run(request, handler, params)
        fingerprint = json.dumps([request.method, request.path, params], sort_keys=True)
        if key in self._in_flight:
            return web.json_response(
                so.error_body(
                    "idempotency_error",
                    "There is currently another in-progress request using this "
                    "Stripe API Key and idempotency key.",
                    code="idempotency_key_in_use",
                ),
                status=409,
            )
        if key in self._idempotent:
            first, status, body = self._idempotent[key]
            if first != fingerprint:
                return web.json_response(
                    so.error_body(
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                    ),
                    status=400,
                )
            return web.Response(
                body=body,
                status=status,
                content_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        self._in_flight.add(key)
        try:
            self._request_key = key
            response = await self._run(request, handler, params)
        finally:
            self._in_flight.discard(key)
            self._request_key = None
        if response.status < 500:
            assert isinstance(response.body, bytes)
            self._idempotent[key] = (fingerprint, response.status, response.body)
        return response

    async def _run(self, request: web.Request, handler: Handler, params: Json) -> web.Response:
        if self.latency:
            await asyncio.sleep(self.latency)
        try:
            return await handler(request, params)
        except StripeApiError as exc:
            return web.json_response(exc.body, status=exc.status)

    def _routes(self, router: web.UrlDispatcher) -> None:
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/v1/customers/search", self._customers_search),
            ("POST", "/v1/customers", self._customer_create),
            ("GET", "/v1/customers", self._customer_list),
            ("GET", "/v1/customers/{id}", self._customer_get),
            ("POST", "/v1/customers/{id}", self._customer_update),
            ("DELETE", "/v1/customers/{id}", self._customer_delete),
            ("GET", "/v1/customers/{id}/payment_methods", self._pm_list),
            ("GET", "/v1/payment_methods", self._pm_list),
            ("GET", "/v1/payment_methods/{id}", self._pm_get),
            ("POST", "/v1/payment_methods/{id}/attach", self._pm_attach),
            ("POST", "/v1/payment_methods/{id}/detach", self._pm_detach),
            ("POST", "/v1/subscriptions", self._sub_create),
            ("GET", "/v1/subscriptions", self._sub_list),
            ("GET", "/v1/subscriptions/{id}", self._sub_get),
            ("POST", "/v1/subscriptions/{id}", self._sub_update),
            ("DELETE", "/v1/subscriptions/{id}", self._sub_cancel),
            ("GET", "/v1/invoices", self._invoice_list),
            ("GET", "/v1/invoices/{id}", self._invoice_get),
            ("POST", "/v1/billing_portal/sessions", self._portal_create),
            ("POST", "/v1/products", self._product_create),
            ("GET", "/v1/products", self._product_list),
            ("GET", "/v1/products/{id}", self._product_get),
            ("POST", "/v1/prices", self._price_create),
            ("GET", "/v1/prices", self._price_list),
            ("GET", "/v1/prices/{id}", self._price_get),
            ("POST", "/v1/billing/meters", self._meter_create),
            ("GET", "/v1/billing/meters", self._meter_list),
            ("GET", "/v1/billing/meters/{id}", self._meter_get),
            ("POST", "/v1/billing/meter_events", self._meter_event_create),
            ("GET", "/v1/events", self._event_list),
            ("GET", "/v1/events/{id}", self._event_get),
        ]
        for method, path, handler in table:

            async def route(request: web.Request, handler: Handler = handler) -> web.Response:
                return await self._dispatch(request, handler)

            router.add_route(method, path, route)

    def _reply(self, obj: Json, params: Json) -> web.Response:
        return web.json_response(self.render(obj, as_list(params.get("expand"))))

    def _list(self, url: str, objects: Iterable[Json], params: Json) -> web.Response:
        items = sorted(objects, key=lambda o: o.get("created", 0), reverse=True)
        if after := params.get("starting_after"):
            ids = [o["id"] for o in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        limit = min(int(params.get("limit", 10)), 100)
        page = items[:limit]
        expand = [e.removeprefix("data.") for e in as_list(params.get("expand"))]
        body = so.list_object(url, [self.render(o, expand) for o in page], len(items) > limit)
        return web.json_response(body)

    # -- expansion --------------------------------------------------------------------------

    def _lookup(self, oid: str) -> Json | None:
        for store in (
            self.customers,
            self.payment_methods,
            self.subscriptions,
            self.invoices,
            self.products,
            self.prices,
            self.meters,
        ):
            if oid in store:
                return store[oid]
        return None

    def render(self, obj: Json, expand: Iterable[str] = ()) -> Json:
        """An object as Stripe answers it, with the ``expand`` paths expanded."""
        out = copy.deepcopy(obj)
        for path in expand:
            self._expand(out, path.split("."))
        return out

    def _expand(self, node: Any, parts: list[str]) -> None:
        if not parts or not isinstance(node, dict):
            return
        key, rest = parts[0], parts[1:]
        if key == "confirmation_secret" and node.get("object") == "invoice":
            # Includable, not expandable: present only when asked for.
            node[key] = copy.deepcopy(self._confirmation_secrets.get(node["id"]))
            return
        value = node.get(key)
        if isinstance(value, str) and (found := self._lookup(value)) is not None:
            node[key] = value = copy.deepcopy(found)
        if isinstance(value, list):
            for v in value:
                self._expand(v, rest)
        else:
            self._expand(value, rest)

    # -- events -----------------------------------------------------------------------------

    def _event(self, event_type: str, obj: Json, previous: Json | None = None) -> Json:
        ev = so.event(
            event_type,
            obj,
            self.now(),
            self.api_version,
            previous=previous,
            request_id=new_id("req") if self._request_key else None,
            idempotency_key=self._request_key,
        )
        self.events.append(ev)
        self.outbox.append(ev)
        return ev

    def take_outbox(self) -> list[Json]:
        """The events not delivered yet, in the order they happened (and forget them)."""
        events, self.outbox = self.outbox, []
        return events

    def build_event(self, event_type: str, object_id: str, previous: Json | None = None) -> Json:
        """A new event of ``event_type`` carrying the current state of ``object_id``."""
        obj = self._lookup(object_id)
        if obj is None:
            obj = so.deleted(object_id.split("_")[0], object_id)
        ev = so.event(event_type, obj, self.now(), self.api_version, previous=previous)
        self.events.append(ev)
        return ev

    def signed(
        self, event: Json, *, secret: str | None = None, timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        payload = json.dumps(event, indent=2).encode()
        ts = self.now() if timestamp is None else timestamp
        header = sign(payload, secret or self.webhook_secret, ts)
        return payload, {"Stripe-Signature": header, "Content-Type": "application/json"}

    async def send_event(
        self,
        event: Json,
        *,
        url: str | None = None,
        secret: str | None = None,
        timestamp: int | None = None,
        signature: str | None = None,
    ) -> int:
        """POST one event as Stripe would; ``signature`` replaces the header (None: signed)."""
        target = url or self.webhook_url
        assert target, "set stripe_double.webhook_url first"
        assert self._session is not None
        payload, headers = self.signed(event, secret=secret, timestamp=timestamp)
        if signature is not None:
            headers["Stripe-Signature"] = signature
        async with self._session.post(target, data=payload, headers=headers) as response:
            await response.read()
            return response.status

    async def deliver(self, events: Iterable[Json] | None = None, **kw: Any) -> list[int]:
        """Send ``events`` (default: the outbox, which is then emptied) in order."""
        batch = self.take_outbox() if events is None else list(events)
        return [await self.send_event(ev, **kw) for ev in batch]

    async def emit(self, event_type: str, object_id: str, **kw: Any) -> Json:
        """Build an event for the current state of ``object_id`` and send it at once."""
        ev = self.build_event(event_type, object_id)
        await self.send_event(ev, **kw)
        return ev

    # -- customers --------------------------------------------------------------------------

    def _customer(self, cid: str, param: str = "id") -> Json:
        c = self.customers.get(cid)
        if c is None or c.get("deleted"):
            raise _missing("customer", cid, param)
        return c

    async def _customer_create(self, request: web.Request, params: Json) -> web.Response:
        c = so.customer(new_id("cus"), self.now(), params)
        self.customers[c["id"]] = c
        self._event("customer.created", c)
        return self._reply(c, params)

    async def _customer_get(self, request: web.Request, params: Json) -> web.Response:
        cid = request.match_info["id"]
        c = self.customers.get(cid)
        if c is None:
            raise _missing("customer", cid)
        return self._reply(c, params)

    async def _customer_list(self, request: web.Request, params: Json) -> web.Response:
        found = [c for c in self.customers.values() if not c.get("deleted")]
        if email := params.get("email"):
            found = [c for c in found if c["email"] == email]
        return self._list("/v1/customers", found, params)

    async def _customers_search(self, request: web.Request, params: Json) -> web.Response:
        clauses = re.findall(r"(metadata\['([^']+)'\]|email|name):'([^']*)'", params["query"])
        if not clauses:
            raise _invalid("unsupported search query", "query")

        def matches(c: Json) -> bool:
            for field, meta_key, value in clauses:
                actual = c["metadata"].get(meta_key) if meta_key else c.get(field)
                if actual != value:
                    return False
            return True

        found = [c for c in self.customers.values() if not c.get("deleted") and matches(c)]
        found.sort(key=lambda c: c["created"], reverse=True)
        limit = int(params.get("limit", 10))
        return web.json_response(
            {
                "object": "search_result",
                "data": [self.render(c) for c in found[:limit]],
                "has_more": len(found) > limit,
                "next_page": None,
                "url": "/v1/customers/search",
            }
        )

    async def _customer_update(self, request: web.Request, params: Json) -> web.Response:
        c = self._customer(request.match_info["id"])
        previous: Json = {}
        settings = params.get("invoice_settings") or {}
        if "default_payment_method" in settings:
            pmid = settings["default_payment_method"] or None
            if pmid is not None:
                pm = self.payment_methods.get(pmid)
                if pm is None:
                    raise _missing(
                        "PaymentMethod", pmid, "invoice_settings[default_payment_method]"
                    )
                if pm["customer"] != c["id"]:
                    raise _invalid(
                        f"The customer does not have a payment method with the ID {pmid}.",
                        "invoice_settings[default_payment_method]",
                    )
            previous["invoice_settings"] = copy.deepcopy(c["invoice_settings"])
            c["invoice_settings"]["default_payment_method"] = pmid
        for field in ("email", "name", "description", "phone"):
            if field in params:
                previous[field] = c[field]
                c[field] = params[field] or None
        if "metadata" in params:
            previous["metadata"] = dict(c["metadata"])
            c["metadata"].update(params["metadata"] or {})
            c["metadata"] = {k: v for k, v in c["metadata"].items() if v != ""}
        if previous:
            self._event("customer.updated", c, previous)
        return self._reply(c, params)

    async def _customer_delete(self, request: web.Request, params: Json) -> web.Response:
        c = self._customer(request.match_info["id"])
        for sub in self.subscriptions.values():
            if sub["customer"] == c["id"] and sub["status"] != "canceled":
                self._end_subscription(sub)
        c["deleted"] = True
        self._event("customer.deleted", c)
        return web.json_response(so.deleted("customer", c["id"]))

    # -- payment methods --------------------------------------------------------------------

    def add_payment_method(self, behaviour: str = "pm_card_visa") -> str:
        """A payment method as Stripe.js creates one (not attached); behaves like the token."""
        brand, last4 = so.TEST_CARDS[behaviour]
        pm = so.payment_method(new_id("pm"), self.now(), brand, last4)
        self.payment_methods[pm["id"]] = pm
        self._card_behaviour[pm["id"]] = behaviour
        return str(pm["id"])

    async def _pm_attach(self, request: web.Request, params: Json) -> web.Response:
        pmid = request.match_info["id"]
        customer = self._customer(params.get("customer", ""), "customer")
        if pmid in so.TEST_CARDS:
            behaviour = pmid
            pmid = self.add_payment_method(pmid)
        elif pmid in self.payment_methods:
            behaviour = self._card_behaviour[pmid]
        else:
            raise _missing("PaymentMethod", pmid)
        if behaviour.startswith("pm_card_chargeDeclined"):
            decline = "insufficient_funds" if "Insufficient" in behaviour else "generic_decline"
            raise StripeApiError(
                402,
                so.error_body(
                    "card_error",
                    "Your card was declined.",
                    code="card_declined",
                    param="",
                    decline_code=decline,
                ),
            )
        pm = self.payment_methods[pmid]
        if pm["customer"] not in (None, customer["id"]):
            raise _invalid(
                "This PaymentMethod was previously used without being attached to a "
                "Customer or was detached from a Customer, and may not be used again."
            )
        pm["customer"] = customer["id"]
        self._event("payment_method.attached", pm)
        return self._reply(pm, params)

    async def _pm_detach(self, request: web.Request, params: Json) -> web.Response:
        pm = self.payment_methods.get(request.match_info["id"])
        if pm is None or pm["customer"] is None:
            raise _missing("PaymentMethod", request.match_info["id"])
        pm["customer"] = None
        self._event("payment_method.detached", pm)
        return self._reply(pm, params)

    async def _pm_get(self, request: web.Request, params: Json) -> web.Response:
        return self._reply(_stored(self.payment_methods, "PaymentMethod", request), params)

    async def _pm_list(self, request: web.Request, params: Json) -> web.Response:
        cid = request.match_info.get("id") or params.get("customer")
        if not cid:
            raise _invalid("customer is required", "customer")
        self._customer(cid, "customer")
        found = [pm for pm in self.payment_methods.values() if pm["customer"] == cid]
        if kind := params.get("type"):
            found = [pm for pm in found if pm["type"] == kind]
        return self._list(request.path, found, params)

    # -- subscriptions ----------------------------------------------------------------------

    def _subscription(self, sid: str) -> Json:
        sub = self.subscriptions.get(sid)
        if sub is None:
            raise _missing("subscription", sid)
        return sub

    def _price(self, prid: str, param: str) -> Json:
        p = self.prices.get(prid)
        if p is None:
            raise _missing("price", prid, param)
        if not p["active"]:
            raise _invalid(f"The price specified is inactive: {prid}", param)
        return p

    def _new_item(self, sub: Json, p: Json, period: tuple[int, int]) -> Json:
        return so.subscription_item(new_id("si"), sub["id"], p, self.now(), period)

    def _period(self, sub: Json) -> tuple[int, int]:
        item = sub["items"]["data"][0]
        return item["current_period_start"], item["current_period_end"]

    def _pay(self, sub: Json, billing_reason: str) -> tuple[Json, str]:
        """Bill the current period: an invoice paid, failed or awaiting 3-D Secure."""
        pmid = self._pm_of(sub)
        behaviour = self._card_behaviour.get(pmid) if pmid else None
        if behaviour is None or behaviour == "pm_card_chargeCustomerFail":
            outcome = "requires_payment_method"
        elif behaviour == "pm_card_authenticationRequired" and (
            billing_reason == "subscription_create"
        ):
            outcome = "requires_action"
        else:
            outcome = "succeeded"
        inv = so.invoice(
            new_id("in"),
            sub,
            self.now(),
            status="paid" if outcome == "succeeded" else "open",
            billing_reason=billing_reason,
            base_url=self.base_url,
        )
        self.invoices[inv["id"]] = inv
        self._confirmation_secrets[inv["id"]] = {
            "client_secret": f"{new_id('pi')}_secret_{secrets.token_hex(12)}",
            "type": "payment_intent",
        }
        sub["latest_invoice"] = inv["id"]
        return inv, outcome

    def _invoice_events(self, inv: Json, outcome: str) -> None:
        self._event("invoice.created", inv)
        self._event("invoice.finalized", inv)
        if outcome == "succeeded":
            self._event("invoice.paid", inv)
            self._event("invoice.payment_succeeded", inv)
        elif outcome == "requires_action":
            self._event("invoice.payment_action_required", inv)
        else:
            self._event("invoice.payment_failed", inv)

    async def _sub_create(self, request: web.Request, params: Json) -> web.Response:
        customer = self._customer(params.get("customer", ""), "customer")
        items_in = as_list(params.get("items"))
        if not items_in:
            raise _invalid("Missing required param: items.", "items")
        prices = [
            self._price(it.get("price", ""), f"items[{i}][price]") for i, it in enumerate(items_in)
        ]
        for i, p in enumerate(prices):
            recurring = p["recurring"] or {}
            if recurring.get("usage_type") == "metered" and not recurring.get("meter"):
                raise _invalid("Metered prices must be backed by a meter.", f"items[{i}][price]")
        pmid = params.get("default_payment_method")
        if pmid and self.payment_methods.get(pmid, {}).get("customer") != customer["id"]:
            raise _missing("PaymentMethod", pmid, "default_payment_method")
        behaviour = params.get("payment_behavior", "allow_incomplete")
        now = self.now()
        sub = so.subscription(new_id("sub"), customer["id"], now)
        period = (now, so.add_month(now))
        sub["items"]["data"] = [self._new_item(sub, p, period) for p in prices]
        sub["items"]["total_count"] = len(prices)
        sub["metadata"] = dict(params.get("metadata") or {})
        sub["default_payment_method"] = pmid
        sub["currency"] = prices[0]["currency"]
        if save := (params.get("payment_settings") or {}).get("save_default_payment_method"):
            sub["payment_settings"]["save_default_payment_method"] = save
        inv, outcome = self._pay(sub, "subscription_create")
        if outcome == "succeeded":
            sub["status"] = "active"
        elif behaviour == "error_if_incomplete":
            del self.invoices[inv["id"]]
            raise StripeApiError(
                402,
                so.error_body(
                    "card_error",
                    "Your card was declined.",
                    code="card_declined",
                    param="",
                    decline_code="generic_decline",
                ),
            )
        else:
            sub["status"] = "incomplete"
        self.subscriptions[sub["id"]] = sub
        self._event("customer.subscription.created", sub)
        self._invoice_events(inv, outcome)
        return self._reply(sub, params)

    async def _sub_get(self, request: web.Request, params: Json) -> web.Response:
        return self._reply(self._subscription(request.match_info["id"]), params)

    async def _sub_list(self, request: web.Request, params: Json) -> web.Response:
        found = list(self.subscriptions.values())
        if cid := params.get("customer"):
            found = [s for s in found if s["customer"] == cid]
        status = params.get("status")
        if status and status != "all":
            found = [s for s in found if s["status"] == status]
        elif not status:
            found = [s for s in found if s["status"] != "canceled"]
        return self._list("/v1/subscriptions", found, params)

    async def _sub_update(self, request: web.Request, params: Json) -> web.Response:
        sub = self._subscription(request.match_info["id"])
        if sub["status"] in ("canceled", "incomplete_expired"):
            raise _invalid(
                "A canceled subscription can only update its cancellation_details and metadata."
            )
        before = copy.deepcopy(sub)
        proration = params.get("proration_behavior", "create_prorations")
        if "items" in params:
            self._update_items(sub, as_list(params["items"]), proration)
        if "cancel_at_period_end" in params:
            flag = as_bool(params["cancel_at_period_end"])
            sub["cancel_at_period_end"] = flag
            sub["cancel_at"] = self._period(sub)[1] if flag else None
            sub["canceled_at"] = self.now() if flag else None
        if "metadata" in params:
            sub["metadata"].update(params["metadata"] or {})
        if "default_payment_method" in params:
            sub["default_payment_method"] = params["default_payment_method"] or None
        previous = {k: before[k] for k in sub if k != "items" and sub[k] != before[k]}
        if sub["items"] != before["items"]:
            previous["items"] = before["items"]
        if previous:
            self._event("customer.subscription.updated", sub, previous)
        return self._reply(sub, params)

    def _update_items(self, sub: Json, changes: list[Json], proration: str) -> None:
        period = self._period(sub)
        data = sub["items"]["data"]
        for i, change in enumerate(changes):
            param = f"items[{i}]"
            if item_id := change.get("id"):
                item = next((it for it in data if it["id"] == item_id), None)
                if item is None:
                    raise _missing("subscription_item", item_id, f"{param}[id]")
                if as_bool(change.get("deleted")):
                    data.remove(item)
                    continue
                if "price" in change:
                    p = self._price(change["price"], f"{param}[price]")
                    self.prorations.append(
                        {
                            "subscription": sub["id"],
                            "item": item_id,
                            "from_price": item["price"]["id"],
                            "to_price": p["id"],
                            "proration_behavior": proration,
                            "at": self.now(),
                        }
                    )
                    metered = (p["recurring"] or {}).get("usage_type") == "metered"
                    item["price"] = copy.deepcopy(p)
                    item["plan"] = so.plan_from_price(p)
                    item["quantity"] = None if metered else int(change.get("quantity", 1))
            else:
                p = self._price(change.get("price", ""), f"{param}[price]")
                data.append(self._new_item(sub, p, period))
        sub["items"]["total_count"] = len(data)

    def _end_subscription(self, sub: Json) -> None:
        now = self.now()
        sub["status"] = "canceled"
        sub["canceled_at"] = sub["canceled_at"] or now
        sub["ended_at"] = now
        sub["cancellation_details"] = {
            "comment": None,
            "feedback": None,
            "reason": "cancellation_requested",
        }
        self._event("customer.subscription.deleted", sub)

    async def _sub_cancel(self, request: web.Request, params: Json) -> web.Response:
        sub = self._subscription(request.match_info["id"])
        if sub["status"] == "canceled":
            raise _invalid(f"No such subscription: '{sub['id']}'", "id")
        self._end_subscription(sub)
        return self._reply(sub, params)

    # Payment life cycle, as time and customers would move it.

    def confirm_payment(self, sub_id: str) -> None:
        """The customer completed 3-D Secure (or paid): the open invoice is paid, sub active."""
        sub = self._subscription(sub_id)
        inv = self.invoices[sub["latest_invoice"]]
        before = copy.deepcopy(sub)
        inv.update(status="paid", amount_paid=inv["amount_due"], amount_remaining=0)
        inv["status_transitions"]["paid_at"] = self.now()
        self._event("invoice.paid", inv)
        self._event("invoice.payment_succeeded", inv)
        sub["status"] = "active"
        self._event("customer.subscription.updated", sub, {"status": before["status"]})

    def fail_payment(self, sub_id: str) -> None:
        """A renewal payment fails: a new open invoice, the subscription past_due."""
        sub = self._subscription(sub_id)
        self._card_behaviour[self._pm_of(sub) or ""] = "pm_card_chargeCustomerFail"
        self.advance_period(sub_id)

    def advance_period(self, sub_id: str) -> None:
        """The period ends: renew (invoice, new period on the items) or end the subscription."""
        sub = self._subscription(sub_id)
        if sub["cancel_at_period_end"]:
            self._end_subscription(sub)
            return
        before = copy.deepcopy(sub)
        start = self._period(sub)[1]
        for item in sub["items"]["data"]:
            item["current_period_start"] = start
            item["current_period_end"] = so.add_month(start)
        inv, outcome = self._pay(sub, "subscription_cycle")
        self._invoice_events(inv, outcome)
        sub["status"] = "active" if outcome == "succeeded" else "past_due"
        previous = {"items": before["items"], "latest_invoice": before["latest_invoice"]}
        if sub["status"] != before["status"]:
            previous["status"] = before["status"]
        self._event("customer.subscription.updated", sub, previous)

    def _pm_of(self, sub: Json) -> str | None:
        pm: str | None = (
            sub["default_payment_method"]
            or (self.customers[sub["customer"]]["invoice_settings"]["default_payment_method"])
        )
        return pm

    # -- invoices, portal -------------------------------------------------------------------

    async def _invoice_list(self, request: web.Request, params: Json) -> web.Response:
        found = list(self.invoices.values())
        if cid := params.get("customer"):
            found = [i for i in found if i["customer"] == cid]
        if sid := params.get("subscription"):
            found = [i for i in found if i["parent"]["subscription_details"]["subscription"] == sid]
        if status := params.get("status"):
            found = [i for i in found if i["status"] == status]
        return self._list("/v1/invoices", found, params)

    async def _invoice_get(self, request: web.Request, params: Json) -> web.Response:
        return self._reply(_stored(self.invoices, "invoice", request), params)

    async def _portal_create(self, request: web.Request, params: Json) -> web.Response:
        customer = self._customer(params.get("customer", ""), "customer")
        s = so.portal_session(customer["id"], self.now(), params.get("return_url"), self.base_url)
        self.portal_sessions[s["id"]] = s
        return self._reply(s, params)

    # -- catalogue --------------------------------------------------------------------------

    async def _product_create(self, request: web.Request, params: Json) -> web.Response:
        if not params.get("name"):
            raise _invalid("Missing required param: name.", "name")
        p = so.product(params.get("id") or new_id("prod"), self.now(), params)
        self.products[p["id"]] = p
        self._event("product.created", p)
        return self._reply(p, params)

    async def _product_list(self, request: web.Request, params: Json) -> web.Response:
        found = _filter_active(list(self.products.values()), params)
        if ids := as_list(params.get("ids")):
            found = [p for p in found if p["id"] in ids]
        return self._list("/v1/products", found, params)

    async def _product_get(self, request: web.Request, params: Json) -> web.Response:
        return self._reply(_stored(self.products, "product", request), params)

    async def _price_create(self, request: web.Request, params: Json) -> web.Response:
        if params.get("product") not in self.products:
            raise _missing("product", str(params.get("product")), "product")
        recurring = params.get("recurring") or {}
        if recurring.get("usage_type") == "metered":
            meter_id = recurring.get("meter")
            if not meter_id or meter_id not in self.meters:
                raise _invalid("Metered prices must be backed by a meter.", "recurring[meter]")
        if "unit_amount" not in params and "unit_amount_decimal" not in params:
            raise _invalid("Missing required param: unit_amount.", "unit_amount")
        key = params.get("lookup_key")
        holder = next((p for p in self.prices.values() if key and p["lookup_key"] == key), None)
        if holder is not None:
            if not as_bool(params.get("transfer_lookup_key")):
                raise _invalid(
                    f"A price (`{holder['id']}`) already uses that lookup key.", "lookup_key"
                )
            holder["lookup_key"] = None
        p = so.price(new_id("price"), self.now(), params)
        self.prices[p["id"]] = p
        self._event("price.created", p)
        return self._reply(p, params)

    async def _price_list(self, request: web.Request, params: Json) -> web.Response:
        found = list(self.prices.values())
        if keys := as_list(params.get("lookup_keys")):
            found = [p for p in found if p["lookup_key"] in keys]
        if product := params.get("product"):
            found = [p for p in found if p["product"] == product]
        found = _filter_active(found, params)
        return self._list("/v1/prices", found, params)

    async def _price_get(self, request: web.Request, params: Json) -> web.Response:
        return self._reply(_stored(self.prices, "price", request), params)

    async def _meter_create(self, request: web.Request, params: Json) -> web.Response:
        name = params.get("event_name")
        if not name or not (params.get("default_aggregation") or {}).get("formula"):
            raise _invalid("Missing required param: event_name or default_aggregation.")
        if any(m["event_name"] == name and m["status"] == "active" for m in self.meters.values()):
            raise _invalid(f"An active meter with event_name {name} already exists.", "event_name")
        m = so.meter(new_id("mtr"), self.now(), params)
        self.meters[m["id"]] = m
        return self._reply(m, params)

    async def _meter_list(self, request: web.Request, params: Json) -> web.Response:
        found = list(self.meters.values())
        if status := params.get("status"):
            found = [m for m in found if m["status"] == status]
        return self._list("/v1/billing/meters", found, params)

    async def _meter_get(self, request: web.Request, params: Json) -> web.Response:
        return self._reply(_stored(self.meters, "billing.meter", request), params)

    async def _meter_event_create(self, request: web.Request, params: Json) -> web.Response:
        payload = params.get("payload") or {}
        if not params.get("event_name"):
            raise _invalid("Missing required param: event_name.", "event_name")
        try:
            int(payload.get("value", ""))
        except ValueError:
            raise _invalid("payload[value] must be an integer.", "payload[value]") from None
        if not payload.get("stripe_customer_id"):
            raise _invalid("payload[stripe_customer_id] is required.", "payload")
        self.meter_event_requests += 1
        identifier = params.get("identifier") or new_id("mev")
        # Stripe accepts a repeated identifier and drops it while aggregating.
        existing = self.meter_events.get(identifier)
        if existing is None:
            existing = so.meter_event(self.now(), params, identifier)
            self.meter_events[identifier] = existing
        return self._reply(existing, params)

    def metered_total(self, customer_id: str | None = None, event_name: str | None = None) -> int:
        """What the meter aggregates (sum of unique events), as the invoice will bill it."""
        return sum(
            int(e["payload"]["value"])
            for e in self.meter_events.values()
            if customer_id in (None, e["payload"].get("stripe_customer_id"))
            and event_name in (None, e["event_name"])
        )

    async def _event_get(self, request: web.Request, params: Json) -> web.Response:
        for ev in self.events:
            if ev["id"] == request.match_info["id"]:
                return self._reply(ev, params)
        raise _missing("event", request.match_info["id"])

    async def _event_list(self, request: web.Request, params: Json) -> web.Response:
        found = self.events
        if kind := params.get("type"):
            found = [e for e in found if e["type"] == kind]
        return self._list("/v1/events", found, params)

    # -- seeding ----------------------------------------------------------------------------

    def seed_catalog(
        self, tiers: Iterable[tuple[str, int, str | None]], event_name: str
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Products, prices and a meter as ``stripe-setup`` makes them, without HTTP.

        ``tiers``: (name, monthly cents, overage unit cents as a decimal string or None).
        Returns (flat price ids, overage price ids) by tier.
        """
        now = self.now()
        m = so.meter(
            new_id("mtr"),
            now,
            {"event_name": event_name, "default_aggregation": {"formula": "sum"}},
        )
        self.meters[m["id"]] = m
        flat: dict[str, str] = {}
        overage: dict[str, str] = {}
        for name, cents, unit in tiers:
            prod = so.product(
                new_id("prod"), now, {"name": f"Metergate {name}", "metadata": {"tier": name}}
            )
            self.products[prod["id"]] = prod
            p = so.price(
                new_id("price"),
                now,
                {
                    "product": prod["id"],
                    "unit_amount": cents,
                    "recurring": {"interval": "month"},
                    "lookup_key": f"metergate_{name}_monthly",
                },
            )
            self.prices[p["id"]] = p
            flat[name] = p["id"]
            if unit is not None:
                o = so.price(
                    new_id("price"),
                    now,
                    {
                        "product": prod["id"],
                        "unit_amount_decimal": unit,
                        "recurring": {
                            "interval": "month",
                            "usage_type": "metered",
                            "meter": m["id"],
                        },
                        "lookup_key": f"metergate_{name}_overage",
                    },
                )
                self.prices[o["id"]] = o
                overage[name] = o["id"]
        return flat, overage
