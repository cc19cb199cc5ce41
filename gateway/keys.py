"""Redis key layout shared by the gateway (reads plans, charges usage) and the admin app.

Every key of one account carries the account id as a Redis Cluster hash tag, ``{acct}``,
so the charge script touches one slot and runs unchanged on Redis Cluster.

- ``mg:{acct}:plan``   hash written by the admin app: ``tier``, ``status``,
  ``period_start``, ``period_end`` (unix seconds), ``past_due_since`` (unix seconds,
  only while past_due), ``updated_at``/``event_created`` (ordering of webhook events).
- ``mg:{acct}:usage``  hash kept by the charge script: ``period_start``, ``period_end``,
  ``used`` (units charged this period), ``overage`` (units beyond the included ones),
  ``tat`` (the rate limiter's theoretical arrival time, ms);
  ``carry_*`` hold a finished period's overage not yet reported to Stripe. The usage
  reporter adds ``reported``, ``reported_period`` and ``report_pending``.
- ``mg:{acct}:daily:YYYY-MM-DD``  hash route -> units that day (analytics, with a TTL).
"""

from __future__ import annotations

PREFIX = "mg"


def account_tag(account: str) -> str:
    """``mg:{acct}``: the prefix of every key of one account (one cluster slot)."""
    return f"{PREFIX}:{{{account}}}"


_tag = account_tag


def plan_key(account: str) -> str:
    return f"{_tag(account)}:plan"


def usage_key(account: str) -> str:
    return f"{_tag(account)}:usage"


def daily_key(account: str, day: str) -> str:
    return f"{_tag(account)}:daily:{day}"


# How many KEYS one charge passes to charge.lua: account_keys' length.
CHARGE_KEYS = 3


def account_keys(account: str, day: str) -> list[str]:
    """The KEYS of one charge, in the order charge.lua expects them."""
    tag = _tag(account)
    return [f"{tag}:plan", f"{tag}:usage", f"{tag}:daily:{day}"]


# Accounts let through while Redis was down (fail-open), for reconciliation.
FAILOPEN_KEY = f"{PREFIX}:failopen"
