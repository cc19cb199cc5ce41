"""A small demo signals backend for `metergate up`: the four priced routes, plausible bodies.

It stands in for the real market-signals API during development; it is not part of the
gateway's request path in production.
"""

from __future__ import annotations

import hashlib
import math
import time

from aiohttp import web

SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "TSLA", "BRK.B", "JPM")


def _price(symbol: str, t: int) -> float:
    seed = int(hashlib.sha256(symbol.encode()).hexdigest()[:6], 16)
    base = 50 + seed % 400
    return round(base * (1 + 0.03 * math.sin(t / 86400 + seed)), 2)


def _signal(symbol: str, t: int) -> dict[str, object]:
    momentum = round(math.sin(t / 3600 + len(symbol)), 3)
    return {
        "symbol": symbol,
        "price": _price(symbol, t),
        "momentum": momentum,
        "signal": "buy" if momentum > 0.3 else "sell" if momentum < -0.3 else "hold",
        "as_of": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
    }


async def signals(request: web.Request) -> web.Response:
    now = int(time.time())
    return web.json_response({"signals": [_signal(s, now) for s in SYMBOLS]})


async def history(request: web.Request) -> web.Response:
    symbol = request.match_info["symbol"].upper()
    now = int(time.time()) // 86400 * 86400
    points = [
        {"date": time.strftime("%Y-%m-%d", time.gmtime(t)), "close": _price(symbol, t)}
        for t in range(now - 29 * 86400, now + 1, 86400)
    ]
    return web.json_response({"symbol": symbol, "history": points})


async def export_csv(request: web.Request) -> web.Response:
    now = int(time.time())
    rows = ["symbol,price,momentum,signal,as_of"]
    for s in SYMBOLS:
        sig = _signal(s, now)
        rows.append(
            ",".join(str(sig[k]) for k in ("symbol", "price", "momentum", "signal", "as_of"))
        )
    return web.Response(
        text="\n".join(rows) + "\n",
        content_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="signals.csv"'},
    )


def _pdf(lines: list[str]) -> bytes:
    """A minimal valid one-page PDF with the lines as text."""
    text = (
        "BT /F1 11 Tf 50 780 Td 14 TL "
        + " ".join(
            "(" + ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") '"
            for ln in lines
        )
        + " ET"
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text.encode("latin-1")),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


async def export_pdf(request: web.Request) -> web.Response:
    now = int(time.time())
    lines = ["Market signals report", ""] + [
        "{symbol:6} {price:>10} {signal}".format(**_signal(s, now)) for s in SYMBOLS
    ]
    return web.Response(
        body=_pdf(lines),
        content_type="application/pdf",
        headers={"Content-Disposition": 'attachment; filename="signals.pdf"'},
    )


def create_demo_backend() -> web.Application:
    app = web.Application()
    app.router.add_get("/signals", signals)
    app.router.add_get("/signals/history/{symbol}", history)
    app.router.add_get("/export/csv", export_csv)
    app.router.add_get("/export/pdf", export_pdf)
    return app
