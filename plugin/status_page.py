"""The AI status page at ``/ai/``: server-rendered HTML an administrator reads at a glance.

Rendered here rather than by a static page fetching the ``/ai/*`` JSON:
one request shows everything (queue, workers, jobs, models, deliveries,
audit trail), it works without JavaScript (which only adds the 10 s
refresh and the Retry buttons' ``fetch``), whether the caller is an
administrator is decided on the server from the request's credentials
(the same rule as the HTTP filter, which enforces it), and what the page
shows is unit-tested as plain text. Every value goes through
:func:`html.escape`; URLs are built from quoted parts. No external resource:
the style and the script are inline, so it works offline.

Links are relative to ``/ai/`` (``../app/explorer.html``, ``../ohif/``),
so they stay right behind a reverse proxy that mounts Orthanc under a
prefix. Orthanc hands a plugin ``/ai`` and ``/ai/`` alike (it drops the
trailing slash before matching), so the page cannot redirect one to the
other; instead its first script adds the slash to the address
(``history.replaceState``), which the relative links then resolve against.

Standard library only: Orthanc's process imports this module.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from engine.ohif import study_link

RETRYABLE = ("failed", "dead")
STATES = ("queued", "running", "done", "skipped", "failed", "dead")
REFRESH_SECONDS = 10

_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
 color:#1d2630;background:#f4f6f8}
header{background:#23364a;color:#fff;padding:10px 18px;display:flex;gap:18px;
 align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}header a{color:#cfe3ff}
main{padding:12px 18px}
section{background:#fff;border:1px solid #d8dee4;border-radius:6px;margin:0 0 14px;
 padding:8px 12px}
h2{font-size:15px;margin:4px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eceff2;vertical-align:top}
th{font-weight:600;color:#4a5866;background:#f8fafb}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(360px,1fr));gap:14px}
.grid section{margin:0}
.st{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e6eaee}
.st-done,.st-ready{background:#d7f2dd;color:#185c2b}
.st-failed,.st-dead,.st-restarting{background:#fbdada;color:#8a1c1c}
.st-running,.st-starting{background:#dce9fb;color:#1d4e89}
.st-queued{background:#fff1c9;color:#6b5000}
.st-skipped,.st-stopped{background:#eceff2;color:#4a5866}
.muted{color:#6a7784}.warn{color:#8a1c1c;font-weight:600}
button.ai-retry{font:inherit;padding:1px 8px;cursor:pointer}
code{font-size:12px}
"""

_SCRIPT = """
(function () {
  if (!location.pathname.endsWith('/')) {
    history.replaceState(null, '', location.pathname + '/' + location.search + location.hash);
  }
  var busy = false;
  document.addEventListener('click', function (ev) {
    var b = ev.target.closest('button.ai-retry');
    if (!b) { return; }
    busy = true;
    b.disabled = true;
    b.textContent = 'Retrying...';
    fetch('jobs/' + encodeURIComponent(b.dataset.job) + '/retry',
          {method: 'POST', credentials: 'same-origin'})
      .then(function (r) {
        b.textContent = r.ok ? 'Queued' : 'Refused (' + r.status + ')';
        busy = false;
      })
      .catch(function () { b.textContent = 'Failed'; busy = false; });
  });
  setInterval(function () { if (!busy) { location.reload(); } }, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))


def e(value: Any) -> str:
    """A value as HTML text (None as an em dash)."""
    if value is None or value == "":
        return "&mdash;"
    return html.escape(str(value), quote=True)


def _url(*parts: str, query: Mapping[str, str] | None = None, fragment: str = "") -> str:
    """A relative URL from path parts (each quoted) and query/fragment values, escaped
    for an attribute."""
    path = "/".join(quote(p, safe="./") if p not in ("..", ".") else p for p in parts)
    if query:
        path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    if fragment:
        path += "#" + fragment
    return html.escape(path, quote=True)


def explorer_url(level: str, resource: str) -> str:
    """Orthanc Explorer's page of a resource, from ``/ai/``."""
    return _url("..", "app", "explorer.html",
                fragment=f"{quote(level, safe='')}?uuid={quote(resource, safe='')}")


def ohif_url(study_instance_uid: str, sr_series_uid: str | None = None) -> str:
    """OHIF's viewer for a study, from ``/ai/`` (the viewer the plugin serves at /ohif/);
    with our SR's series, opened on that SR."""
    return html.escape("../" + study_link(study_instance_uid, sr_series_uid), quote=True)


def _state(state: Any) -> str:
    s = str(state or "")
    css = s if s in (*STATES, "ready", "starting", "restarting", "stopped") else "other"
    return f'<span class="st st-{css}">{e(s)}</span>'


def _table(headers: Sequence[str], rows: Iterable[str], *, table_id: str = "",
           numeric: Sequence[int] = (), empty: str = "none") -> str:
    rows = list(rows)
    ident = f' id="{e(table_id)}"' if table_id else ""
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{e(h)}</th>'
                   for i, h in enumerate(headers))
    body = "".join(rows) if rows else \
        f'<tr><td colspan="{len(headers)}" class="muted">{e(empty)}</td></tr>'
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _seconds(value: Any) -> str:
    if value is None:
        return "&mdash;"
    v = float(value)
    return e(f"{v:.2f} s" if v < 10 else f"{v:.0f} s")


def _bytes(value: Any) -> str:
    if value is None:
        return "&mdash;"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return e(f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}")
        n /= 1024
    return e(value)


# -- the sections -----------------------------------------------------------------

def _queue(status: Mapping[str, Any]) -> str:
    queue = status.get("queue") or {}
    kinds: Mapping[str, Mapping[str, int]] = queue.get("jobs") or {}
    rows = []
    for kind, counts in kinds.items():
        cells = "".join(f'<td class="n">{e(counts.get(s, 0))}</td>' for s in STATES)
        rows.append(f"<tr><th>{e(kind)}</th>{cells}</tr>")
    analysis = kinds.get("analysis") or {}
    depth = int(queue.get("inbox") or 0) + int(analysis.get("queued", 0)) + \
        int(analysis.get("running", 0))
    reach = "" if queue.get("reachable", True) else \
        ' <span class="warn">the queue database is unreachable</span>'
    return (
        '<section id="ai-queue"><h2>Queue</h2>'
        f'<p>Depth <strong id="ai-queue-depth">{e(depth)}</strong> '
        f'(inbox <span id="ai-inbox">{e(queue.get("inbox", 0))}</span> not yet triaged, '
        f'plus analyses queued and running); queue <code>{e(queue.get("location"))}</code>'
        f'{reach}</p>'
        + _table(("jobs", *STATES), rows, table_id="ai-counts",
                 numeric=tuple(range(1, len(STATES) + 1)))
        + "</section>")


def _workers(status: Mapping[str, Any]) -> str:
    node = status.get("node")
    rows = []
    for w in status.get("workers") or []:
        rows.append(
            f'<tr><td>{e(node)}</td><td class="n">{e(w.get("index"))}</td>'
            f'<td class="n">{e(w.get("pid"))}</td><td>{_state(w.get("state"))}</td>'
            f'<td class="n">{e(w.get("restarts"))}</td><td>{e(w.get("last_exit"))}</td>'
            f'<td>{e(w.get("started"))}</td></tr>')
    nodes = []
    for n in status.get("nodes") or []:
        mark = ' <span class="muted">(this node)</span>' if n.get("node") == node else ""
        nodes.append(
            f'<tr><td>{e(n.get("node"))}{mark}</td><td class="n">{e(n.get("running"))}</td>'
            f'<td class="n">{e(n.get("jobs"))}</td><td>{e(n.get("last_update"))}</td></tr>')
    ready = "ready" if status.get("ready") else "not ready (no worker has loaded the models)"
    return (
        '<section id="ai-workers"><h2>Workers and nodes</h2>'
        f'<p>This node: <strong>{e(node)}</strong>, {e(ready)}</p>'
        + _table(("node", "worker", "pid", "state", "restarts", "last exit", "started"),
                 rows, table_id="ai-worker-table", numeric=(1, 2, 4),
                 empty="no worker process")
        + '<h2>Nodes seen in the latest jobs</h2>'
        + _table(("node", "running", "jobs", "last update"), nodes,
                 table_id="ai-nodes", numeric=(1, 2), empty="no job has run yet")
        + "</section>")


def _job_row(job: Mapping[str, Any], admin: bool) -> str:
    result = job.get("result") or {}
    job_id = str(job.get("id", ""))
    study, series = job.get("study"), job.get("series")
    links = []
    if study:
        links.append(f'<a href="{explorer_url("study", study)}">study</a>')
    if series:
        links.append(f'<a href="{explorer_url("series", series)}">series</a>')
    if result.get("sr_instance"):
        links.append(f'<a href="{explorer_url("instance", result["sr_instance"])}">SR</a>')
    uid = job.get("study_instance_uid") or result.get("study_instance_uid")
    if uid:
        links.append(f'<a class="ai-ohif" '
                     f'href="{ohif_url(uid, result.get("sr_series_instance_uid"))}">OHIF</a>')
    model = job.get("model")
    if model and job.get("model_version"):
        model = f"{model} {job['model_version']}"
    action = ""
    if admin and job.get("state") in RETRYABLE:
        action = f'<button type="button" class="ai-retry" data-job="{e(job_id)}">Retry</button>'
    next_attempt = f'<br><span class="muted">next attempt {e(job["next_attempt"])}</span>' \
        if job.get("next_attempt") else ""
    return (
        f'<tr data-job-id="{e(job_id)}" data-state="{e(job.get("state"))}">'
        f'<td class="n"><a href="{_url("jobs", job_id)}">{e(job_id)}</a></td>'
        f'<td>{e(job.get("updated"))}</td><td>{_state(job.get("state"))}</td>'
        f'<td>{e(model)}</td><td>{e(job.get("level"))}</td>'
        f'<td class="ai-finding">{e(job.get("summary"))}</td>'
        f'<td class="n">{e(job.get("attempts"))}</td>'
        f'<td class="ai-reason">{e(job.get("reason"))}{next_attempt}</td>'
        f'<td>{e(job.get("node"))}</td><td>{" ".join(links) or "&mdash;"}</td>'
        f"<td>{action}</td></tr>")


def _jobs(status: Mapping[str, Any], admin: bool) -> str:
    jobs = status.get("jobs") or []
    note = "" if admin else \
        '<p class="muted">Retrying is for AI.Administrators; sign in as one to retry.</p>'
    return (
        f'<section id="ai-recent"><h2>Latest {e(len(jobs))} analyses</h2>{note}'
        + _table(("job", "updated", "state", "model", "level", "finding", "attempts", "reason",
                  "node", "open", ""),
                 (_job_row(j, admin) for j in jobs), table_id="ai-jobs", numeric=(0, 6),
                 empty="no analysis yet")
        + "</section>")


def _models(status: Mapping[str, Any]) -> str:
    rows = []
    for m in status.get("models") or []:
        counts = m.get("counts") or {}
        cells = "".join(f'<td class="n">{e(counts.get(s, 0))}</td>' for s in STATES)
        rows.append(
            f'<tr><td>{e(m.get("model"))}</td><td>{e(m.get("version"))}</td>{cells}'
            f'<td class="n">{_seconds(m.get("p50_s"))}</td>'
            f'<td class="n">{_seconds(m.get("p95_s"))}</td></tr>')
    latency = status.get("latency") or {}
    stages = []
    for stage, h in (latency.get("stages") or {}).items():
        stages.append(
            f'<tr><td>{e(stage)}</td><td class="n">{e(h.get("count"))}</td>'
            f'<td class="n">{_seconds(h.get("mean_s"))}</td>'
            f'<td class="n">{_seconds(h.get("p50_s"))}</td>'
            f'<td class="n">{_seconds(h.get("p95_s"))}</td></tr>')
    end = latency.get("end_to_end")
    if end:
        stages.append(
            f'<tr><th>end to end</th><td class="n">{e(end.get("count"))}</td>'
            f'<td class="n">{_seconds(end.get("mean_s"))}</td>'
            f'<td class="n">{_seconds(end.get("p50_s"))}</td>'
            f'<td class="n">{_seconds(end.get("p95_s"))}</td></tr>')
    window = status.get("model_window")
    return (
        '<section id="ai-models"><h2>Models</h2>'
        f'<p class="muted">Counts and time from queued to finished over the latest '
        f'{e(window)} analyses.</p>'
        + _table(("model", "version", *STATES, "p50", "p95"), rows, table_id="ai-model-table",
                 numeric=tuple(range(2, len(STATES) + 4)), empty="no analysis yet")
        + '<h2>Pipeline latency <span class="muted">(all models, since the workers '
          "started counting; p50/p95 are histogram bucket bounds)</span></h2>"
        + _table(("stage", "count", "mean", "p50", "p95"), stages, table_id="ai-latency",
                 numeric=(1, 2, 3, 4), empty="nothing measured yet")
        + "</section>")


def _deliveries(status: Mapping[str, Any]) -> str:
    d = status.get("deliveries") or {}
    rows = []
    for x in d.get("recent") or []:
        sr = f'<a href="{explorer_url("instance", x["sr_instance"])}">SR</a>' \
            if x.get("sr_instance") else "&mdash;"
        rows.append(
            f'<tr data-delivery-id="{e(x.get("id"))}"><td class="n">{e(x.get("id"))}</td>'
            f'<td>{e(x.get("kind"))}</td><td>{e(x.get("destination"))}</td>'
            f'<td>{_state(x.get("state"))}</td><td class="n">{e(x.get("attempts"))}</td>'
            f'<td>{e(x.get("reason"))}</td><td>{e(x.get("updated"))}</td><td>{sr}</td></tr>')
    return (
        '<section id="ai-deliveries"><h2>Deliveries</h2>'
        '<p class="muted">C-STORE forwards (AI.Forward) and HL7 ORU messages (AI.HL7).</p>'
        + _table(("id", "kind", "destination", "state", "attempts", "reason", "updated", ""),
                 rows, table_id="ai-delivery-table", numeric=(0, 4), empty="no delivery yet")
        + "</section>")


def _audit(status: Mapping[str, Any]) -> str:
    a = status.get("audit") or {}
    if not a.get("enabled"):
        return ('<section id="ai-audit"><h2>Audit trail</h2>'
                '<p class="warn">No audit log.</p></section>')
    repo = a.get("repository")
    if repo:
        backlog = int(repo.get("backlog") or 0)
        error = f' <span class="warn">{e(repo["last_error"])}</span>' \
            if repo.get("last_error") else ""
        shipped = (
            f'<p>Audit repository <code>{e(repo.get("host"))}:{e(repo.get("port"))}</code> '
            f'({e(repo.get("transport"))}): sent up to entry {e(repo.get("forwarded_seq"))}, '
            f'<strong class="{"warn" if backlog else ""}">{e(backlog)}</strong> waiting'
            f'{error}</p>')
    else:
        shipped = ('<p>No audit repository configured (<code>AI.Audit.Host</code>): '
                   "the local log only.</p>")
    return (
        '<section id="ai-audit"><h2>Audit trail</h2>'
        f'<p>Local log <code>{e(a.get("log"))}</code>: {_bytes(a.get("size_bytes"))}, '
        f'{e(a.get("last_seq"))} entries</p>{shipped}</section>')


def render_status(status: Mapping[str, Any], *, admin: bool) -> str:
    """The whole page. ``status`` holds plain values (what :class:`plugin.routes.Api`
    gathers); ``admin``: whether to show the Retry buttons."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>AI status &ndash; {e(status.get("node"))}</title>'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>'
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>"
        f'<header><h1>AI status</h1><span>{e(status.get("node"))}</span>'
        f'<span id="ai-version" class="muted">orthanc-ai {e(status.get("version"))}</span>'
        f'<span class="muted">{e(status.get("generated"))}, refreshed every '
        f"{REFRESH_SECONDS} s</span>"
        '<a href="../app/explorer.html">Orthanc Explorer</a>'
        '<a href="jobs">jobs (JSON)</a><a href="metrics">metrics</a>'
        '<a href="models">models</a></header><main>'
        + _queue(status)
        + '<div class="grid">' + _workers(status) + _audit(status) + "</div><p></p>"
        + _jobs(status, admin)
        + _models(status)
        + _deliveries(status)
        + "</main></body></html>")
