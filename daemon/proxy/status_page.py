"""The status page at `/` on the proxy listeners: server-rendered HTML, refreshed by itself.

What the wrapper knows (`GET /status`): the resident set (each loaded model's state, port,
memory, requests running and waiting, idle time and when it unloads) and the memory
budget; the last requests; per-minute totals of the last hour, drawn as small
charts with uPlot (vendored in `static/`, no build step). Numbers carry `data-` attributes
so a test can read them back.

Who may see it: a browser cannot send the API key header, so clients on this machine
(loopback) see it as they are; anyone else logs in once with the key (`/login`), which sets
an HttpOnly cookie holding it.
"""

from __future__ import annotations

import functools
import html
import json
import time
from pathlib import Path

from ..resident_view import budget_line, rows as resident_rows

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"uPlot.iife.min.js": "application/javascript", "uPlot.min.css": "text/css"}
COOKIE = "mlxgate_key"
REFRESH_SECONDS = 5


@functools.lru_cache(maxsize=len(STATIC_FILES))
def static_file(name: str) -> bytes:
    """A vendored file, read from the package once."""
    return (STATIC / name).read_bytes()


STYLE = """
body{font:14px/1.4 -apple-system,system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:15px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff;min-width:50%} td,th{padding:4px 10px;border-bottom:1px solid #eee;
text-align:left;font-variant-numeric:tabular-nums} th{color:#666;font-weight:600}
.ready{color:#187a3b}.failed{color:#b3261e}.starting,.stopping{color:#a15c00}.stopped{color:#777}
.charts{display:flex;gap:24px;flex-wrap:wrap} .chart{background:#fff;padding:8px;border:1px solid #eee}
.muted{color:#777} a{color:#1a56b0} .totals span{margin-right:24px}
"""


def _esc(value) -> str:
    return html.escape(str(value if value is not None else "-"))


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(data: dict, links: dict[str, str]) -> str:
    servers = data.get("servers") or {}
    totals = data.get("totals") or {}
    rows = []
    for row in resident_rows(servers):
        rows.append(
            f"<tr data-server='{_esc(row['model'])}'><td>{_esc(row['model'])}</td><td class='{_esc(row['state'])}'>"
            f"{_esc(row['state'])}</td><td>{_esc(row['port'])}</td><td>{_esc(row['memory'])}</td>"
            f"<td data-in-flight='{row['in_flight']}'>{row['in_flight']}</td>"
            f"<td data-queued='{row['queued']}'>{row['queued']}</td><td>{_esc(row['idle'])}</td>"
            f"<td>{_esc(row['unloads'])}</td><td class='muted'>{_esc(row['detail'])}</td></tr>")
    recent = []
    for r in (data.get("recent") or [])[:25]:
        when = time.strftime("%H:%M:%S", time.localtime(r["at"]))
        outcome = r["error"] or ("cancelled" if r["cancelled"] else "ok")
        recent.append(f"<tr><td>{when}</td><td>{_esc(r['client'])}</td><td>{_esc(r['api'])}</td>"
                      f"<td>{_esc(r['requested_model'])}</td><td>{_esc(r['served_model'])}</td>"
                      f"<td>{r['status']}</td><td>{_esc(outcome)}</td><td>{r['input_tokens']}</td>"
                      f"<td>{r['cached_tokens']}</td><td>{r['output_tokens']}</td><td>{_ms(r['ttft_ms'])}</td>"
                      f"<td>{_ms(r['total_ms'])}</td></tr>")
    series = data.get("series") or []
    chart_data = json.dumps({"t": [s["minute"] for s in series],
                             "rate": [s["tokens_per_second"] for s in series],
                             "cached": [s["cached_tokens"] for s in series],
                             "input": [s["input_tokens"] for s in series]})
    link_html = " · ".join(f"<a href='{_esc(url)}'>{_esc(name)}</a>" for name, url in links.items())
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(data.get("since") or time.time()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mlxgate</title>
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<link rel="stylesheet" href="/static/uPlot.min.css"><style>{STYLE}</style></head>
<body>
<h1>mlxgate</h1>
<div class="muted">refreshes every {REFRESH_SECONDS} s · {link_html}</div>
<h2>Loaded models</h2>
<div class="muted" data-memory>{_esc(budget_line(data.get('memory') or {}))}</div>
<table><tr><th>model</th><th>state</th><th>port</th><th>memory</th><th>running</th><th>waiting</th><th>idle</th>
<th>unloads</th><th>detail</th></tr>{''.join(rows) or '<tr><td colspan=9 class=muted>none loaded</td></tr>'}</table>
<h2>Since {since}</h2>
<div class="totals"><span>requests <b data-total="requests">{totals.get('requests', 0)}</b></span>
<span>errors <b data-total="errors">{totals.get('errors', 0)}</b></span>
<span>input tokens <b data-total="input_tokens">{totals.get('input_tokens', 0)}</b></span>
<span>cached tokens <b data-total="cached_tokens">{totals.get('cached_tokens', 0)}</b></span>
<span>output tokens <b data-total="output_tokens">{totals.get('output_tokens', 0)}</b></span></div>
<h2>Last hour</h2>
<div class="charts"><div class="chart" id="rate"></div><div class="chart" id="cache"></div></div>
<h2>Recent requests</h2>
<table><tr><th>time</th><th>client</th><th>API</th><th>requested</th><th>served by</th><th>status</th>
<th>outcome</th><th>input</th><th>cached</th><th>output</th><th>first token ms</th><th>total ms</th></tr>
{''.join(recent) or '<tr><td colspan=12 class=muted>none yet</td></tr>'}</table>
<script src="/static/uPlot.iife.min.js"></script>
<script>
const d = {chart_data};
const opts = (title, label, color) => ({{title, width: 440, height: 180, scales: {{x: {{time: true}}}},
  series: [{{}}, {{label, stroke: color, fill: color + "22"}}]}});
new uPlot(opts("output tokens/s (per minute)", "tokens/s", "#1a56b0"), [d.t, d.rate], document.getElementById("rate"));
new uPlot(opts("prompt tokens read from the cache (per minute)", "cached", "#187a3b"), [d.t, d.cached],
          document.getElementById("cache"));
</script>
</body></html>"""


LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>mlxgate login</title><style>{style}</style></head>
<body><h1>mlxgate</h1><p>This page is open to clients on this machine. From elsewhere, log in with the
gateway's API key (`mlxgate env` prints it); it is kept in a cookie for this browser.</p>
<form method="post" action="/login"><input type="password" name="key" size="40" autofocus>
<button>Log in</button></form>{problem}</body></html>"""


def login_page(problem: str = "") -> str:
    return LOGIN.format(style=STYLE, problem=f"<p class='failed'>{_esc(problem)}</p>" if problem else "")
