"""Locust scenarios for a running gateway: the four priced routes, several accounts.

Where ``make bench`` measures the cost of the hot path with wrk, this drives a gateway the
way clients do: each simulated user is one account with its own token and a realistic
mix of cheap and expensive routes, with think time. Install with ``pip install -e '.[load]'``.

    METERGATE_JWT_SECRET=... locust -f loadtests/locustfile.py --host http://127.0.0.1:8080

Environment: METERGATE_JWT_SECRET (default: the development secret, as `metergate up`
uses), LOCUST_ACCOUNTS (how many accounts the users spread over, default 20),
LOCUST_ACCOUNT_PREFIX (default ``locust-``). Accounts without a plan are on the free tier
and will see 429 after 100 units: expected, and counted as a success by these scenarios;
write enterprise plans for them (see loadtests/bench.py) to measure without denials.
"""

from __future__ import annotations

import itertools
import os
import random

from locust import FastHttpUser, between, task
from locust.contrib.fasthttp import ResponseContextManager

from config.settings import DEV_JWT_SECRET
from gateway.auth import issue_token

_SECRET = os.environ.get("METERGATE_JWT_SECRET") or DEV_JWT_SECRET
_ACCOUNTS = [
    f"{os.environ.get('LOCUST_ACCOUNT_PREFIX', 'locust-')}{i}"
    for i in range(int(os.environ.get("LOCUST_ACCOUNTS", "20")))
]
_SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "TSLA")
_next_account = itertools.cycle(_ACCOUNTS)


class ApiClient(FastHttpUser):
    """One API customer: mostly live signals, some history, occasional exports."""

    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.account = next(_next_account)
        token = issue_token(_SECRET, self.account, ttl=24 * 3600)
        self.headers = {"Authorization": f"Bearer {token}"}

    def _get(self, path: str, name: str) -> None:
        with self.client.get(path, headers=self.headers, name=name, catch_response=True) as resp:
            _judge(resp)

    @task(10)
    def signals(self) -> None:
        self._get("/signals", "/signals")

    @task(5)
    def history(self) -> None:
        symbol = random.choice(_SYMBOLS)
        self._get(f"/signals/history/{symbol}", "/signals/history/{symbol}")

    @task(2)
    def export_csv(self) -> None:
        self._get("/export/csv", "/export/csv")

    @task(1)
    def export_pdf(self) -> None:
        self._get("/export/pdf", "/export/pdf")


def _judge(resp: ResponseContextManager) -> None:
    # 200 is served; 429 is the quota doing its job. Anything else is a failure.
    if resp.status_code in (200, 429):
        resp.success()
    else:
        resp.failure(f"status {resp.status_code}: {resp.text[:200] if resp.text else ''}")
