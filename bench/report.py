"""From measurement records to medians, pairwise ratios, a markdown report and
an SVG chart (hand-written SVG: no plotting library needed).

A record is one figure set from one repetition:
  {"rep", "peer", "mtu" (None for loopback), "case", "ok", "error", "values"}."""

import html
import statistics

PEERS = ["slipway", "slipway-plain", "pasta", "pasta-2025", "slirp4netns", "loopback"]
OTHERS = ["slipway-plain", "pasta", "pasta-2025", "slirp4netns", "loopback"]
COLORS = {"slipway": "#d9480f", "slipway-plain": "#f08c00", "pasta": "#1971c2", "pasta-2025": "#7048e8",
          "slirp4netns": "#2f9e44", "loopback": "#868e96"}

CASE_LABELS = {
    "tcp_g2h_P1": "TCP guest→host, 1 stream",
    "tcp_g2h_P4": "TCP guest→host, 4 streams",
    "tcp_h2g_P1": "TCP host→guest, 1 stream",
    "tcp_h2g_P4": "TCP host→guest, 4 streams",
    "udp_g2h": "UDP guest→host",
    "udp_h2g": "UDP host→guest",
    "crr": "TCP connect+request+response",
    "rr": "1-byte request/response RTT",
    "connect": "TCP connect",
    "session": "stack process",
}

# The egress proxy's table: slipway through microsocks against its direct path.
PROXY_FIGURES = [
    ("tcp_g2h_P1", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("tcp_g2h_P4", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("tcp_h2g_P1", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("tcp_h2g_P4", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("crr", "cps", "rate", "conn/s", "higher", "{:.0f}"),
    ("connect", "p50_us", "latency p50", "µs", "lower", "{:.0f}"),
    ("connect", "p99_us", "latency p99", "µs", "lower", "{:.0f}"),
]

# (case, value key, what, unit, which way is better, format)
FIGURES = [
    ("tcp_g2h_P1", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("tcp_g2h_P4", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("tcp_h2g_P1", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("tcp_h2g_P4", "gbps", "throughput", "Gbit/s", "higher", "{:.2f}"),
    ("udp_g2h", "gbps", "received", "Gbit/s", "higher", "{:.3f}"),
    ("udp_g2h", "loss_pct", "loss", "%", "lower", "{:.2f}"),
    ("udp_h2g", "gbps", "received", "Gbit/s", "higher", "{:.3f}"),
    ("udp_h2g", "loss_pct", "loss", "%", "lower", "{:.2f}"),
    ("crr", "cps", "rate", "conn/s", "higher", "{:.0f}"),
    ("rr", "p50_us", "p50", "µs", "lower", "{:.0f}"),
    ("rr", "p99_us", "p99", "µs", "lower", "{:.0f}"),
    ("tcp_g2h_P1", "cpu_per_gb", "stack CPU", "s/GB", "lower", "{:.2f}"),
    ("tcp_g2h_P4", "cpu_per_gb", "stack CPU", "s/GB", "lower", "{:.2f}"),
    ("tcp_h2g_P1", "cpu_per_gb", "stack CPU", "s/GB", "lower", "{:.2f}"),
    ("tcp_h2g_P4", "cpu_per_gb", "stack CPU", "s/GB", "lower", "{:.2f}"),
    ("udp_g2h", "cpu_per_gb", "stack CPU", "s/GB", "lower", "{:.2f}"),
    ("udp_h2g", "cpu_per_gb", "stack CPU", "s/GB", "lower", "{:.2f}"),
    ("crr", "cpu_us_per_conn", "stack CPU", "µs/conn", "lower", "{:.0f}"),
    ("session", "rss_mib", "peak RSS (VmHWM)", "MiB", "lower", "{:.1f}"),
]


def _records(records, peer, mtu, case):
    want_mtu = None if peer == "loopback" else mtu
    return [r for r in records if r["peer"] == peer and r["mtu"] == want_mtu and r["case"] == case]


def _by_rep(records, peer, mtu, case, key):
    return {r["rep"]: r["values"][key] for r in _records(records, peer, mtu, case)
            if r["ok"] and r["values"].get(key) is not None}


def cell(records, peer, mtu, case, key):
    """(median or None, how many reps gave a value, how many reps ran)."""
    ran = _records(records, peer, mtu, case)
    vals = list(_by_rep(records, peer, mtu, case, key).values())
    return (statistics.median(vals) if vals else None), len(vals), len(ran)


def ratio(records, mtu, case, key, other):
    """Median over repetitions of slipway/other, each pair from the same repetition."""
    mine = _by_rep(records, "slipway", mtu, case, key)
    theirs = _by_rep(records, other, mtu, case, key)
    pairs = []
    for rep, v in mine.items():
        w = theirs.get(rep)
        if w is None:
            continue
        if w == 0:
            pairs.append(float("inf") if v > 0 else 1.0)
        else:
            pairs.append(v / w)
    return (statistics.median(pairs) if pairs else None), len(pairs)


def paired(records, mtu, case, key, a, b, how):
    """Median over repetitions of how(a's figure, b's figure), same repetition."""
    mine = _by_rep(records, a, mtu, case, key)
    theirs = _by_rep(records, b, mtu, case, key)
    vals = [how(v, theirs[rep]) for rep, v in mine.items() if rep in theirs]
    return statistics.median(vals) if vals else None


def proxy_table(records, mtus):
    """slipway-socks (every TCP flow through microsocks) against slipway's
    direct path, at the first MTU: the ratio, and for latencies the time added."""
    mtu = mtus[0]
    rows = []
    for case, key, what, unit, better, form in PROXY_FIGURES:
        if not _records(records, "slipway-socks", mtu, case):
            continue
        cells = [fmt_cell(records, p, mtu, case, key, form) for p in ("slipway", "slipway-socks")]
        r = paired(records, mtu, case, key, "slipway-socks", "slipway",
                   lambda v, w: (v / w) if w else float("inf"))
        added = "—"
        if unit == "µs":
            d = paired(records, mtu, case, key, "slipway-socks", "slipway", lambda v, w: v - w)
            added = f"{d:+.0f} µs" if d is not None else "—"
        rows.append(f"| {CASE_LABELS[case]} — {what} | {mtu} | {better} | {unit} | "
                    + " | ".join(cells) + f" | {fmt_ratio(r)} | {added} |")
    if not rows:
        return []
    return ["| figure | MTU | better | unit | slipway (direct) | slipway-socks | socks ÷ direct "
            "| added |", "|---|---:|---|---|---:|---:|---:|---:|"] + rows


def fmt_ratio(r):
    if r is None:
        return "—"
    if r == float("inf"):
        return "∞"
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def fmt_cell(records, peer, mtu, case, key, form):
    med, n, ran = cell(records, peer, mtu, case, key)
    if ran == 0:
        return "—"
    if med is None:
        return "**FAILED**" if any(not r["ok"] for r in _records(records, peer, mtu, case)) else "n/a"
    text = form.format(med)
    return text if n == ran else f"{text} ({n}/{ran} ok)"


def figure_rows(records, mtus):
    """Rows (label, mtu, case, key, unit, better, form) that have any record at all."""
    rows = []
    for mtu in mtus:
        for case, key, what, unit, better, form in FIGURES:
            if any(_records(records, p, mtu, case) for p in PEERS if p != "loopback"):
                rows.append((f"{CASE_LABELS[case]} — {what}", mtu, case, key, unit, better, form))
    return rows


def markdown(records, meta, mtus, notes):
    out = [f"# slipway benchmark — {meta['date']} on {meta['host']}", ""]
    if meta.get("interrupted"):
        out += ["**This run was interrupted: the figures below are partial.**", ""]
    out += ["| | |", "|---|---|"]
    for k, v in meta["env"]:
        out.append(f"| {k} | {v} |")
    out += ["", "Medians over repetitions. Ratios are slipway ÷ peer, computed per repetition "
            "(same repetition, measured minutes apart at most) and then the median taken. "
            "For *higher is better* figures a ratio above 1 means slipway is ahead; for "
            "*lower is better* figures (latency, loss, CPU, memory) a ratio above 1 means slipway "
            "is behind. Loopback has no stack process and no MTU: its figures (lo, MTU 65536) "
            "are the same limit in both MTU sections. slipway-plain is slipway with "
            "`--offload false` (no virtio-net header: plain frames, no TSO), TCP throughput "
            "only; ÷ slipway-plain is what the tap offloads are worth. See bench/README.md.", ""]
    head = ("| figure | MTU | better | unit | " + " | ".join(PEERS) + " | "
            + " | ".join(f"÷ {o}" for o in OTHERS) + " |")
    out += [head, "|---|---:|---|---|" + "---:|" * (len(PEERS) + len(OTHERS))]
    for label, mtu, case, key, unit, better, form in figure_rows(records, mtus):
        cells = [fmt_cell(records, p, mtu, case, key, form) for p in PEERS]
        ratios = [fmt_ratio(ratio(records, mtu, case, key, o)[0]) for o in OTHERS]
        out.append(f"| {label} | {mtu} | {better} | {unit} | " + " | ".join(cells + ratios) + " |")
    proxy = proxy_table(records, mtus)
    if proxy:
        out += ["", "Egress proxy: slipway with every TCP flow through microsocks (SOCKS5, on the "
                "host's loopback) against slipway's direct path, same repetition; the ratio is "
                "socks ÷ direct, *added* the connect time the proxy's dial adds (TCP to the proxy, "
                "greeting, CONNECT, the proxy's own connect). Stack CPU and memory are slipway's "
                "only; microsocks's copy loop is part of the path.", ""] + proxy
    retrans = retransmit_table(records, mtus)
    if retrans:
        out += ["", "TCP segments retransmitted by the sending kernel (median per run; guest→host: "
                "the namespace's kernel sending into the stack, so retransmits mean the stack lost or "
                "refused segments):", ""] + retrans
    out += ["", "## Notes", ""]
    out += [f"- {n}" for n in notes] if notes else ["- none: every case ran, no stalls seen."]
    return "\n".join(out) + "\n"


def retransmit_table(records, mtus):
    rows = []
    for mtu in mtus:
        for case in ("tcp_g2h_P1", "tcp_g2h_P4"):
            cells = [fmt_cell(records, p, mtu, case, "retransmits", "{:.0f}") for p in PEERS]
            if all(c == "—" for c in cells[:-1]):
                continue
            rows.append(f"| {CASE_LABELS[case]} | {mtu} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["| case | MTU | " + " | ".join(PEERS) + " |",
            "|---|---:|" + "---:|" * len(PEERS)] + rows


# -- SVG ----------------------------------------------------------------

def _esc(s):
    return html.escape(str(s), quote=True)


def svg(records, meta, mtus):
    """Two panels: each rate as a fraction of the loopback limit (one bar per
    stack), and the request/response latencies in µs."""
    rate_groups = []
    for mtu in mtus:
        for case, key, what, unit, better, form in FIGURES:
            if better != "higher":
                continue
            limit = cell(records, "loopback", mtu, case, key)[0]
            bars = []
            for p in PEERS[:-1]:
                med, n, ran = cell(records, p, mtu, case, key)
                if ran == 0:
                    continue
                if med is None:
                    bars.append((p, 0.0, "FAILED"))
                elif limit:
                    bars.append((p, med / limit, f"{form.format(med)} {unit}"))
                else:
                    bars.append((p, 0.0, f"{form.format(med)} {unit} (no loopback figure)"))
            if bars:
                rate_groups.append((f"{CASE_LABELS[case]}, MTU {mtu}", bars))
    lat_groups = []
    for key in ("p50_us", "p99_us"):
        mtu = mtus[0]
        bars = []
        for p in PEERS:
            med, n, ran = cell(records, p, mtu, "rr", key)
            if ran:
                bars.append((p, med or 0.0, f"{med:.0f} µs" if med is not None else "FAILED"))
        if bars:
            lat_groups.append((f"1-byte RTT {key[:3]}, MTU {mtu}", bars))

    width, label_w, bar_h, gap = 980, 300, 13, 10
    plot_w = width - label_w - 170
    parts = []
    y = 52

    def panel(title, groups, scale_max, axis_fmt, ticks):
        nonlocal y
        parts.append(f'<text x="10" y="{y}" font-size="15" font-weight="bold">{_esc(title)}</text>')
        y += 14
        top = y
        for label, bars in groups:
            parts.append(f'<text x="{label_w - 8}" y="{y + bar_h * len(bars) / 2 + 4:.0f}" '
                         f'text-anchor="end" font-size="12">{_esc(label)}</text>')
            for peer, v, text in bars:
                w = max(0.0, min(v / scale_max, 1.0)) * plot_w
                parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                             f'fill="{COLORS[peer]}"><title>{_esc(peer)}: {_esc(text)}</title></rect>')
                parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}" font-size="10" '
                             f'fill="#333">{_esc(text)}</text>')
                y += bar_h
            y += gap
        for t in ticks:
            x = label_w + t / scale_max * plot_w
            parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y - gap}" stroke="#bbb" '
                         f'stroke-dasharray="3,3"/>')
            parts.append(f'<text x="{x:.1f}" y="{y + 4}" font-size="10" text-anchor="middle">'
                         f'{_esc(axis_fmt(t))}</text>')
        y += 30

    if rate_groups:
        top_ratio = max([v for _, bars in rate_groups for _, v, _ in bars] + [1.0])
        panel("Rates as a fraction of direct loopback (the limit = 100%; longer is better)",
              rate_groups, top_ratio, lambda t: f"{t * 100:.0f}%",
              [t / 4 for t in range(0, int(top_ratio * 4) + 1)])
    if lat_groups:
        top_lat = max([v for _, bars in lat_groups for _, v, _ in bars] + [1.0])
        step = _nice_step(top_lat)
        panel("Request/response latency, µs (shorter is better)", lat_groups, top_lat,
              lambda t: f"{t:.0f}", [step * i for i in range(int(top_lat / step) + 1)])

    legend_x = label_w
    for p in PEERS:
        parts.append(f'<rect x="{legend_x}" y="{y - 10}" width="12" height="12" fill="{COLORS[p]}"/>')
        parts.append(f'<text x="{legend_x + 16}" y="{y}" font-size="12">{p}</text>')
        legend_x += 120
    y += 20
    parts.append(f'<text x="10" y="{y}" font-size="10" fill="#555">{_esc(meta["date"])} · '
                 f'{_esc(meta["host"])} · medians of {meta["reps"]} repetition(s) · bench/run</text>')
    y += 10
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="10" y="20" font-size="17" font-weight="bold">slipway vs pasta, slirp4netns '
            f'and loopback</text>')
    return head + "".join(parts) + "</svg>\n"


def _nice_step(top):
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if top / step <= 8:
            return step
    return 10000
