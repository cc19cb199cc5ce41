"""Billing periods for accounts without a paid plan: calendar months in UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def calendar_month(now: float) -> tuple[int, int]:
    """(start, end) of the UTC calendar month containing ``now``, as unix seconds."""
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class PeriodClock:
    """Caches the current month and day so the hot path formats no dates."""

    __slots__ = ("_day", "_day_end", "_month", "_month_end")

    def __init__(self) -> None:
        self._month = (0, 0)
        self._month_end = 0.0
        self._day = ""
        self._day_end = 0.0

    def month_and_day(self, now: float) -> tuple[tuple[int, int], str]:
        return self.month(now), self.day(now)

    def month(self, now: float) -> tuple[int, int]:
        if not self._month[0] <= now < self._month_end:
            self._month = calendar_month(now)
            self._month_end = float(self._month[1])
        return self._month

    def day(self, now: float) -> str:
        if not self._day_end - 86400 <= now < self._day_end:
            self._day = utc_day(now)
            self._day_end = (int(now) // 86400 + 1) * 86400.0
        return self._day
