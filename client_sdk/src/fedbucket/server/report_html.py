"""Pages about a federation, rendered on the server: HTML with inline SVG plots (matplotlib), no
JavaScript and nothing fetched from elsewhere, so they work offline, inside Airflow (the Federation
page) and as one self-contained file (``fedbucket report --html``).

Every function takes a :class:`~fedbucket.server.federation.FederationView` and returns text; links
are made from ``base`` (the page's mount point) so the same pages serve under any prefix.
"""

from __future__ import annotations

import html
import io
import json
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from fedbucket.server.federation import FederationView, ModelRow, RoundDetail, RoundRow

PAGE_SIZE = 50
SECURE_MARK = ' <span class="muted">(secure)</span>'
CURRENT_MARK = " <b>(current)</b>"
CLIENTS_PER_PAGE = 100
#: Colours of a participation cell: accepted, late, any other rejection, absent.
CELL_COLOURS = {"accepted": "#2e7d32", "late": "#f9a825", "rejected": "#c62828", "absent": "#eeeeee"}
STATUS_COLOURS = {"promoted": "#2e7d32", "rejected": "#ef6c00", "superseded": "#6a1b9a", "abandoned": "#757575",
                  "failed": "#c62828"}  # fmt: skip

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1f2933;background:#fafafa}
header{background:#017cee;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600} header .title{font-size:18px;font-weight:700}
main{padding:16px 24px;max-width:1200px} h1{font-size:22px} h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;background:#fff;font-size:13px} th,td{border:1px solid #d9dee3;padding:4px 8px;
text-align:left;vertical-align:top} th{background:#f0f3f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.status{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px} .muted{color:#6b7785}
.pager a{margin-right:12px} .cards{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.card{background:#fff;border:1px solid
#d9dee3;border-radius:6px;padding:8px 14px} .card b{display:block;font-size:20px} code{font-size:12px}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def status_badge(status: str) -> str:
    return f'<span class="status" style="background:{STATUS_COLOURS.get(status, "#555")}">{esc(status)}</span>'


def page(title: str, body: str, *, base: str = "", bucket: str = "", standalone: bool = False) -> str:
    """One page: header with navigation (none when ``standalone``: a report file has no other pages)."""
    links = (("", "Rounds"), ("models", "Models"), ("clients", "Clients"))
    nav = "" if standalone else "".join(f'<a href="{esc(base)}{route}">{label}</a>' for route, label in links)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head><body>'
        f'<header><span class="title">fedbucket</span>{nav}<span class="muted" style="color:#dbeafe">'
        f"{esc(bucket)}</span></header><main>{body}</main></body></html>"
    )


def svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG (text kept as text: searchable, and testable in a browser)."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    try:
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})  # same bytes, same data
    finally:
        plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    return plt


# -- plots ---------------------------------------------------------------------------------------


_PLOTS: dict[tuple[str, str], str] = {}
#: pyplot's state is global: one drawing at a time (the Airflow page serves requests from threads).
DRAWING = threading.Lock()


def _cached(kind: str, rows: Sequence[RoundRow], draw: Callable[[Sequence[RoundRow]], str]) -> str:
    """A plot of finished rounds is the same picture until a round is added: drawn once per set."""
    key = (kind, repr(rows))
    with DRAWING:
        if key not in _PLOTS:
            if len(_PLOTS) > 64:
                _PLOTS.clear()
            _PLOTS[key] = draw(rows)
        return _PLOTS[key]


def rounds_plot(rows: Sequence[RoundRow]) -> str:
    return _cached("rounds", rows, _draw_rounds)


def duration_plot(rows: Sequence[RoundRow]) -> str:
    return _cached("durations", rows, _draw_durations)


def _draw_rounds(rows: Sequence[RoundRow]) -> str:
    """Candidate and current model figures per round; promoted rounds marked; ε on a second axis."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.2), sharex=True, height_ratios=[3, 1.4])
    xs = list(range(len(rows)))
    for key, label, style in (("accuracy", "accuracy", "-o"), ("macro_f1", "macro-F1", "-s")):
        ys = [r.candidate.get(key, math.nan) for r in rows]
        top.plot(xs, ys, style, markersize=4, label=f"candidate {label}")
    top.plot(xs, [r.current.get("accuracy", math.nan) for r in rows], "--", color="#888", label="current accuracy")
    for x, r in zip(xs, rows, strict=True):
        if r.status == "promoted":
            top.axvline(x, color="#2e7d32", alpha=0.08, linewidth=6)
    top.set_ylabel("held-out score")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    losses = [r.candidate.get("loss", math.nan) for r in rows]
    bottom.plot(xs, losses, "-", color="#c62828", label="candidate loss")
    bottom.set_ylabel("loss")
    bottom.grid(alpha=0.3)
    epsilons = [r.epsilon if r.epsilon is not None else math.nan for r in rows]
    if any(not math.isnan(e) for e in epsilons):
        eps_axis = bottom.twinx()
        eps_axis.plot(xs, epsilons, "-^", color="#6a1b9a", markersize=3, label="epsilon spent")
        eps_axis.set_ylabel("ε")
    step = max(1, len(rows) // 20)
    bottom.set_xticks(xs[::step], [r.round_id for r in rows][::step], rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return svg(fig)


def _draw_durations(rows: Sequence[RoundRow]) -> str:
    """The wait for updates (usually minutes) and the aggregation's phases (seconds), each on its own axis."""
    plt = _pyplot()
    fig, (wait_axis, axis) = plt.subplots(1, 2, figsize=(10, 2.4), width_ratios=[1, 2])
    xs = list(range(len(rows)))
    wait_axis.bar(xs, [r.wait_seconds or 0.0 for r in rows], color="#90a4ae")
    wait_axis.set_title("wait for updates, s", fontsize=9)
    bottom = [0.0] * len(rows)
    # one-pass rounds validate while they aggregate; two-pass rounds (clipping, DP, secure sums) do not
    for phase in ("read_headers_s", "validate_s", "validate_and_aggregate_s", "aggregate_s", "recompute_s", "write_s"):
        values = [r.timings.get(phase, 0.0) for r in rows]
        axis.bar(xs, values, bottom=bottom, label=phase.removesuffix("_s"))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_title("aggregation by phase, s", fontsize=9)
    axis.legend(fontsize=8, ncols=3)
    for ax in (wait_axis, axis):
        ax.grid(alpha=0.3, axis="y")
        ax.set_xticks([])
    fig.tight_layout()
    return svg(fig)


def confusion_plot(matrix: list[list[int]], title: str) -> str:
    with DRAWING:
        return _draw_confusion(matrix, title)


def _draw_confusion(matrix: list[list[int]], title: str) -> str:
    plt = _pyplot()
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(min(8, 1.5 + 0.45 * n), min(8, 1.2 + 0.45 * n)))
    ax.imshow(matrix, cmap="Blues")
    if n <= 20:
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > max(map(max, matrix)) / 2 else "black")  # fmt: skip
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return svg(fig)


def participation_plot(clients: Sequence[str], rounds: Sequence[str], cells: dict) -> str:
    """Clients x rounds, coloured by what happened to each client's update."""
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    codes = {"absent": 0, "accepted": 1, "late": 2, "rejected": 3}
    grid = [
        [codes.get(cells.get((c, r), "absent"), codes["rejected"]) for r in rounds]
        for c in clients
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(10, max(2.0, min(14.0, 0.16 * len(clients) + 1.2))))
    colours = ListedColormap([CELL_COLOURS[k] for k in ("absent", "accepted", "late", "rejected")])
    ax.imshow(grid, aspect="auto", cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    if len(clients) <= 60:
        ax.set_yticks(range(len(clients)), clients, fontsize=7)
    ax.set_xlabel("round")
    step = max(1, len(rounds) // 20)
    ax.set_xticks(range(0, len(rounds), step), list(rounds)[::step], rotation=45, ha="right", fontsize=7)
    fig.tight_layout()
    return svg(fig)


# -- pages ---------------------------------------------------------------------------------------


def _pager(base: str, route: str, current: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = []
    if current > 1:
        links.append(f'<a href="{esc(base)}{route}?page={current - 1}">← newer</a>')
    links.append(f"page {current} of {pages}")
    if current < pages:
        links.append(f'<a href="{esc(base)}{route}?page={current + 1}">older →</a>')
    return f'<p class="pager">{" ".join(links)}</p>'


def rounds_table(rows: Sequence[RoundRow], *, base: str, link: bool = True) -> str:
    head = (
        "<tr><th>round</th><th>status</th><th>accepted</th><th>rejected (code)</th><th>accuracy</th>"
        "<th>macro-F1</th><th>loss</th><th>current acc.</th><th>ε</th><th>clip</th><th>wait s</th>"
        "<th>aggregation s</th></tr>"
    )
    body = []
    for r in rows:
        name = f'<a href="{esc(base)}rounds/{esc(r.round_id)}">{esc(r.round_id)}</a>' if link else esc(r.round_id)
        rejected = ", ".join(f"{esc(code)} x{n}" for code, n in r.rejected.items()) or "-"
        body.append(
            f"<tr><td>{name}{SECURE_MARK if r.secure else ''}</td><td>{status_badge(r.status)}</td>"
            f'<td class="num">{r.accepted}</td><td>{rejected}</td>'
            f'<td class="num">{fmt(r.candidate.get("accuracy"))}</td>'
            f'<td class="num">{fmt(r.candidate.get("macro_f1"))}</td>'
            f'<td class="num">{fmt(r.candidate.get("loss"))}</td>'
            f'<td class="num">{fmt(r.current.get("accuracy"))}</td><td class="num">{fmt(r.epsilon, 2)}</td>'
            f'<td class="num">{fmt(r.clip_norm, 3)}</td><td class="num">{fmt(r.wait_seconds, 1)}</td>'
            f'<td class="num">{fmt(r.timings.get("total_s"), 2)}</td></tr>'
        )
    return f"<table>{head}{''.join(body)}</table>"


def overview_page(view: FederationView, *, base: str = "", page_number: int = 1) -> str:
    rows = view.rounds()
    promoted = sum(1 for r in rows if r.status == "promoted")
    _, current = view.models(rows)
    clients, _, _ = view.participation(rows[-PAGE_SIZE:])
    cards = (
        f'<div class="cards"><div class="card">rounds<b>{len(rows)}</b></div><div class="card">promoted<b>'
        f'{promoted}</b></div><div class="card">current model<b>{esc(current or "-")}</b></div>'
        f'<div class="card">last accuracy<b>{fmt(rows[-1].candidate.get("accuracy") if rows else None)}</b></div>'
        f'<div class="card">clients (last {PAGE_SIZE} rounds)<b>{len(clients)}</b></div></div>'
    )
    pages = max(1, math.ceil(len(rows) / PAGE_SIZE))
    page_number = min(max(1, page_number), pages)
    newest_first = rows[::-1][(page_number - 1) * PAGE_SIZE : page_number * PAGE_SIZE]
    plotted = rows[-200:]  # the plot shows the last 200 rounds; the table pages through all of them
    body = (
        f"<h1>Federation</h1>{cards}<h2>Rounds over time{' (last 200)' if len(rows) > 200 else ''}</h2>"
        + (rounds_plot(plotted) + duration_plot(plotted) if rows else "<p>No round has finished yet.</p>")
        + f"<h2>Rounds</h2>{_pager(base, '', page_number, pages)}{rounds_table(newest_first, base=base)}"
        + _pager(base, "", page_number, pages)
    )
    return page("fedbucket: federation", body, base=base, bucket=view.store.url)


def round_section(detail: RoundDetail, *, airflow: str | None = None) -> str:
    r, report = detail.row, detail.report
    links = ""
    if airflow is not None and report.airflow.get("dag_id") and report.airflow.get("run_id"):
        dag_id, run_id = (quote(report.airflow[k], safe="") for k in ("dag_id", "run_id"))
        run = esc(f"{airflow.rstrip('/')}/dags/{dag_id}/runs/{run_id}")
        links = (
            f'<p>Airflow: <a target="_top" href="{run}">the run</a> · logs of <a target="_top" '
            f'href="{run}/tasks/aggregate">aggregate</a>, <a target="_top" href="{run}/tasks/evaluate">evaluate</a>, '
            f'<a target="_top" href="{run}/tasks/report">report</a></p>'
        )
    verdicts = "".join(
        f"<tr><td>{esc(u.client_id)}</td><td>{'accepted' if u.accepted else esc(u.code)}</td>"
        f'<td class="num">{u.num_examples}</td><td class="num">{fmt(u.weight, 4)}</td><td>{esc(u.reason)}</td></tr>'
        for u in report.updates
    )
    timings = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in r.timings.items()) or "-"
    if r.wait_seconds is not None:
        timings = f"waited {r.wait_seconds:.1f} s for updates; aggregation: {timings}"
    privacy = ""
    if report.privacy is not None:
        m, spent = report.privacy.mechanism, report.privacy.spent
        privacy = (
            f"<p>Differential privacy ({esc(m.kind)}): ε {spent.epsilon:.3f} at δ {spent.delta:g} after this round "
            f"(budget {fmt(spent.budget, 2)}), z {m.noise_multiplier:g}, clip norm {m.clip_norm:.4g}, noise std "
            f"{m.noise_stddev:.3g} per coordinate, {m.charged_clients} client(s) charged.</p>"
        )
    secure = ""
    if detail.aggregation is not None and detail.aggregation.secure_aggregation is not None:
        s = detail.aggregation.secure_aggregation
        secure = (
            f"<p>Secure aggregation: threshold {s.threshold}, {len(s.advertised)} advertised, {len(s.shared)} shared "
            f"keys, {len(s.masked)} masked inputs in the sum, {len(s.responded)} answered the unmasking; dropped "
            f"after sharing: {esc(', '.join(s.dropped_after_shares) or 'none')}. The server saw only the sum.</p>"
        )
    evaluation = ""
    if detail.evaluation is not None:
        for source in ("validation", "test"):
            split = getattr(detail.evaluation, source)
            metrics = split.candidate if source == "validation" and split is not None else split
            if metrics is None:
                continue
            classes = "".join(
                f'<tr><td>{esc(c)}</td><td class="num">{fmt(m.precision)}</td><td class="num">{fmt(m.recall)}</td>'
                f'<td class="num">{fmt(m.f1)}</td><td class="num">{m.support}</td></tr>'
                for c, m in metrics.per_class.items()
            )
            evaluation += (
                f"<h3>Candidate on the server's {source} split: accuracy {fmt(metrics.accuracy)}, macro-F1 "
                f'{fmt(metrics.macro_f1)}, loss {fmt(metrics.loss)}</h3><div class="cards"><table><tr><th>class'
                f"</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{classes}</table>"
                + (confusion_plot(metrics.confusion, f"confusion ({source})") if metrics.confusion else "")
                + "</div>"
            )
        if detail.evaluation.federated is not None:
            f = detail.evaluation.federated
            evaluation += (
                f"<h3>Clients' scores: {f.reports} report(s), pooled from {esc(', '.join(f.used))}; trimmed "
                f"{esc(', '.join(f.trimmed) or 'none')}; candidate accuracy "
                f"{fmt(f.candidate.accuracy if f.candidate else None)} vs current "
                f"{fmt(f.current.accuracy if f.current else None)}</h3>"
            )
    return (
        f'<h2 id="round-{esc(r.round_id)}">Round {esc(r.round_id)} {status_badge(r.status)}</h2>'
        f'<p>{esc(report.message)}</p><p class="muted">base {esc(report.base_model_version)}'
        f"{' → ' + esc(report.promoted_version) if report.promoted_version else ''}; {esc(timings)}</p>"
        f"{links}{privacy}{secure}<table><tr><th>client</th><th>verdict</th><th>examples</th><th>weight</th>"
        f"<th>reason</th></tr>{verdicts}</table>{evaluation}"
    )


def round_page(view: FederationView, round_id: str, *, base: str = "", airflow: str | None = None) -> str | None:
    detail = view.round_detail(round_id)
    if detail is None:
        return None
    body = f'<p><a href="{esc(base)}">← all rounds</a></p>{round_section(detail, airflow=airflow)}'
    return page(f"fedbucket: round {round_id}", body, base=base, bucket=view.store.url)


def _options(model: ModelRow) -> str:
    return json.dumps(model.strategy_options) if model.strategy_options else ""


def models_table(models: Sequence[ModelRow], current: str | None, *, base: str) -> str:
    rows = "".join(
        f"<tr><td>{esc(m.version)}{CURRENT_MARK if m.version == current else ''}</td><td>{esc(m.parent or '-')}</td>"
        f"<td>{esc(m.round_id or '-')}</td><td>{esc(m.strategy or '-')} <code>{esc(_options(m))}</code>"
        f"</td><td>{'differentially private (no client named)' if m.private else esc(', '.join(m.clients) or '-')}"
        f'</td><td class="num">{fmt(m.metrics.get("accuracy"))}</td><td><code>{esc(m.sha256[:16])}…</code></td>'
        f'<td class="num">{m.size_bytes:,}</td></tr>'
        for m in models[::-1]
    )
    return (
        "<table><tr><th>version</th><th>parent</th><th>round</th><th>strategy</th><th>built from</th>"
        f"<th>accuracy</th><th>sha256</th><th>bytes</th></tr>{rows}</table>"
    )


def models_page(view: FederationView, *, base: str = "", a: str | None = None, b: str | None = None) -> str:
    models, current = view.models()
    by_version = {m.version: m for m in models}
    diff = ""
    if a in by_version and b in by_version:
        ma, mb = by_version[a], by_version[b]
        cells = "".join(
            f'<tr><td>{k}</td><td class="num">{fmt(ma.metrics.get(k))}</td><td class="num">{fmt(mb.metrics.get(k))}'
            f'</td><td class="num">{fmt(mb.metrics[k] - ma.metrics[k]) if k in ma.metrics and k in mb.metrics else "-"}'
            "</td></tr>"
            for k in ("accuracy", "macro_f1", "loss")
        )
        diff = (
            f"<h2>{esc(a)} → {esc(b)}</h2><table><tr><th>metric</th><th>{esc(a)}</th><th>{esc(b)}</th><th>change</th>"
            f"</tr>{cells}</table>"
        )

    def options(chosen: str | None) -> str:
        return "".join(
            f'<option value="{esc(m.version)}"{" selected" if m.version == chosen else ""}>{esc(m.version)}</option>'
            for m in models[::-1]
        )

    first = models[0].version if models else None
    form = (
        f'<form method="get" action="{esc(base)}models">Compare <select name="a">{options(a or first)}</select> with '
        f'<select name="b">{options(b or current)}</select> <button type="submit">diff</button></form>'
    )
    body = f"<h1>Model registry</h1><p>Current: <b>{esc(current or '-')}</b></p>{form}{diff}<h2>Versions</h2>"
    body += models_table(models, current, base=base)
    return page("fedbucket: models", body, base=base, bucket=view.store.url)


def clients_section(
    view: FederationView,
    *,
    base: str,
    page_number: int = 1,
    rows: Sequence[RoundRow] | None = None,
    paged: bool = True,
) -> str:
    """Participation over ``rows`` (default: the last 100 rounds); ``paged``: 100 clients a page."""
    rows = list(rows) if rows is not None else view.rounds()[-100:]
    clients, round_ids, cells = view.participation(rows)
    per_page = CLIENTS_PER_PAGE if paged else max(1, len(clients))
    pages = max(1, math.ceil(len(clients) / per_page))
    page_number = min(max(1, page_number), pages)
    shown = clients[(page_number - 1) * per_page : page_number * per_page]

    def rejections(client: str) -> str:
        found = [f"{r}: {cells[(client, r)]}" for r in round_ids if cells.get((client, r), "accepted") != "accepted"]
        return ", ".join(found) or "-"

    history = "".join(
        f'<tr><td>{esc(c)}</td><td class="num">{sum(cells.get((c, r)) == "accepted" for r in round_ids)}</td>'
        f"<td>{esc(rejections(c))}</td></tr>"
        for c in shown
    )
    legend = " ".join(
        f'<span class="status" style="background:{colour};color:{"#333" if key == "absent" else "#fff"}">{key}</span>'
        for key, colour in CELL_COLOURS.items()
    )
    return (
        f"<h2>Participation ({len(clients)} clients, last {len(round_ids)} rounds)</h2><p>{legend}</p>"
        + (participation_plot(shown, round_ids, cells) if shown else "<p>No updates yet.</p>")
        + _pager(base, "clients", page_number, pages)
        + "<h2>Rejection history</h2><table><tr><th>client</th><th>accepted rounds</th><th>rejections (round: code)"
        f"</th></tr>{history}</table>"
    )


def clients_page(view: FederationView, *, base: str = "", page_number: int = 1) -> str:
    body = "<h1>Clients</h1>" + clients_section(view, base=base, page_number=page_number)
    return page("fedbucket: clients", body, base=base, bucket=view.store.url)


def report_file(view: FederationView, round_ids: Sequence[str]) -> str:
    """The self-contained report: overview plot and table of the chosen rounds, each round's
    section, the registry and the participation heatmap, in one HTML file."""
    wanted = set(round_ids)
    rows = [r for r in view.rounds() if r.round_id in wanted]
    models, current = view.models()
    sections = "".join(round_section(d) for d in (view.round_detail(r.round_id) for r in rows) if d is not None)
    body = (
        f"<h1>Federation report: {len(rows)} round(s)</h1>"
        + (rounds_plot(rows) + duration_plot(rows) if rows else "<p>No round has finished yet.</p>")
        + f"<h2>Rounds</h2>{rounds_table(rows, base='#', link=False)}{sections}"
        + f"<h2>Model registry</h2>{models_table(models, current, base='')}"
        + clients_section(view, base="", rows=rows, paged=False)
    )
    return page("fedbucket report", body, bucket=view.store.url, standalone=True)


def report_markdown(view: FederationView, round_ids: Sequence[str]) -> str:
    wanted = set(round_ids)
    rows = [r for r in view.rounds() if r.round_id in wanted]
    lines = [
        f"# Federation report: {len(rows)} round(s)",
        "",
        f"Bucket: `{view.store.url}`",
        "",
        "| round | status | accepted | rejected (code) | accuracy | macro-F1 | loss | ε |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rejected = ", ".join(f"{code} x{n}" for code, n in r.rejected.items()) or "-"
        lines.append(
            f"| {r.round_id} | {r.status} | {r.accepted} | {rejected} | {fmt(r.candidate.get('accuracy'))} | "
            f"{fmt(r.candidate.get('macro_f1'))} | {fmt(r.candidate.get('loss'))} | {fmt(r.epsilon, 2)} |"
        )
    for r in rows:
        lines += ["", f"## {r.round_id}: {r.status}", "", r.message]
    return "\n".join(lines) + "\n"
