"""The microVM benchmark's report: medians per transport, pairwise ratios
(slipway transport ÷ passt, ÷ qemu user), a markdown table and an SVG chart
in the style of bench/report.py (whose helpers it borrows).

A record is one figure set from one boot:
  {"rep", "transport", "case" (boot, g2h, h2g, rr, crr), "ok", "error", "values"}."""

import statistics

import report  # bench/report.py

CASE_LABELS = {
    "boot": "boot",
    "g2h": "TCP guest→host",
    "h2g": "TCP host→guest",
    "rr": "1-byte request/response",
    "crr": "connect+request+response",
}

# (case, value key, label, unit, which way is better, format)
FIGURES = [
    ("g2h", "gbps", "TCP guest→host (iperf3)", "Gbit/s", "higher", "{:.2f}"),
    ("h2g", "gbps", "TCP host→guest (iperf3 -R)", "Gbit/s", "higher", "{:.2f}"),
    ("rr", "p50_us", "1-byte RTT p50", "µs", "lower", "{:.0f}"),
    ("rr", "p90_us", "1-byte RTT p90", "µs", "lower", "{:.0f}"),
    ("rr", "p99_us", "1-byte RTT p99", "µs", "lower", "{:.0f}"),
    ("crr", "cps", "connect+request+response", "conn/s", "higher", "{:.0f}"),
    ("g2h", "cpu_per_gb", "stack CPU, guest→host", "s/GB", "lower", "{:.2f}"),
    ("h2g", "cpu_per_gb", "stack CPU, host→guest", "s/GB", "lower", "{:.2f}"),
    ("g2h", "qemu_cpu_share", "QEMU CPU, guest→host", "cores", "—", "{:.2f}"),
    ("g2h", "retransmits", "retransmits guest→host (guest kernel)", "segments", "lower", "{:.0f}"),
    ("h2g", "retransmits", "retransmits host→guest (host kernel)", "segments", "lower", "{:.0f}"),
    ("boot", "guest_mtu", "guest MTU (by DHCP)", "bytes", "—", "{:.0f}"),
    ("boot", "boot_s", "QEMU start → guest /init", "s", "lower", "{:.2f}"),
    ("boot", "dhcp_ms", "DHCP lease", "ms", "lower", "{:.0f}"),
    ("boot", "rss_mib", "stack peak RSS (VmHWM)", "MiB", "lower", "{:.1f}"),
]

# The figures that get ratio columns.
RATIO_FIGURES = [f for f in FIGURES if f[1] in ("gbps", "p50_us", "p99_us", "cps")]
BASELINES = ["passt", "qemu-user"]

# A colour per kind of transport; the same kind at another MTU (`stream@1500`)
# gets the lighter shade.
KIND_COLORS = {"stream": ("#d9480f", "#ffa94d"), "dgram": ("#f08c00", "#ffd43b"),
               "vhost-user": ("#c2255c", "#f783ac"), "tap": ("#862e9c", "#da77f2"),
               "vhost-user-plain": ("#e64980", "#fcc2d7"), "tap-plain": ("#ae3ec9", "#eebefa"),
               "passt": ("#1971c2", "#74c0fc"), "qemu-user": ("#2f9e44", "#8ce99a")}


def is_slipway(t):
    return t.partition("@")[0] not in BASELINES


def colors(transports):
    return {t: KIND_COLORS[t.partition("@")[0]][1 if "@" in t else 0] for t in transports}


def _records(records, transport, case):
    return [r for r in records if r["transport"] == transport and r["case"] == case]


def _by_rep(records, transport, case, key):
    return {r["rep"]: r["values"][key] for r in _records(records, transport, case)
            if r["ok"] and r["values"].get(key) is not None}


def cell(records, transport, case, key):
    ran = _records(records, transport, case)
    vals = list(_by_rep(records, transport, case, key).values())
    return (statistics.median(vals) if vals else None), len(vals), len(ran)


def ratio(records, case, key, mine, other):
    """Median over repetitions of mine/other, each pair from the same repetition."""
    a, b = _by_rep(records, mine, case, key), _by_rep(records, other, case, key)
    pairs = []
    for rep, v in a.items():
        w = b.get(rep)
        if w is None:
            continue
        pairs.append(v / w if w else (float("inf") if v > 0 else 1.0))
    return (statistics.median(pairs) if pairs else None), len(pairs)


def fmt_cell(records, transport, case, key, form):
    med, n, ran = cell(records, transport, case, key)
    if ran == 0:
        return "—"
    if med is None:
        if any(not r["ok"] for r in _records(records, transport, case)):
            return "**FAILED**"
        return "n/a"
    text = form.format(med)
    return text if n == ran else f"{text} ({n}/{ran} ok)"


def describe(records, rep, transport):
    """One progress line for one boot."""
    mine = {r["case"]: r for r in records if r["rep"] == rep and r["transport"] == transport}
    b = mine.get("boot")
    if b and not b["ok"]:
        return "FAILED: " + (b["error"] or "?")
    parts = []
    for case in ("g2h", "h2g"):
        r = mine.get(case)
        if r is None:
            continue
        if r["ok"]:
            v = r["values"]
            s = f"{case} {v['gbps']:5.2f} Gbit/s"
            if v.get("cpu_per_gb") is not None:
                s += f" ({v['cpu_per_gb']:.2f} s/GB)"
            if v.get("stalled_intervals"):
                s += f" STALLS {v['intervals_gbps']}"
            if (v.get("drain_s") or 0) > 0.5:
                s += f" STALLED: receiver {v['receiver_s']:.1f} s for sender {v['sender_s']:.1f} s"
            parts.append(s)
        else:
            parts.append(f"{case} FAILED ({r['error']})")
    r = mine.get("rr")
    if r:
        parts.append(f"RTT p50 {r['values']['p50_us']:.0f} p99 {r['values']['p99_us']:.0f} µs"
                     if r["ok"] else f"rr FAILED ({r['error']})")
    r = mine.get("crr")
    if r:
        parts.append(f"{r['values']['cps']:.0f} conn/s" if r["ok"] else f"crr FAILED ({r['error']})")
    if b and b["ok"]:
        v = b["values"]
        parts.append(f"boot {v['boot_s']:.1f} s, MTU {v['guest_mtu']}")
    return "; ".join(parts)


def markdown(records, meta, notes):
    ts = meta["transports"]
    labels = meta["labels"]
    out = [f"# slipway microVM benchmark — {meta['date']} on {meta['host']}", ""]
    if meta.get("interrupted"):
        out += ["**This run was interrupted: the figures below are partial.**", ""]
    out += ["| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in meta["env"]]
    out += ["", "The same guest over each transport, booted once per transport and repetition; "
            "the guest is the client in every test (iperf3 -c / -c -R, bench/microvm/rr.c) and "
            "reaches servers on the host's 127.0.0.1 at 10.0.2.2. Under TCG the guest's emulated "
            "CPU is the bottleneck: compare transports within this run, not with the netns "
            "benchmark. Medians over repetitions. See bench/microvm/README.md.", ""]
    out += ["| figure | unit | better | " + " | ".join(labels[t] for t in ts) + " |",
            "|---|---|---|" + "---:|" * len(ts)]
    for case, key, what, unit, better, form in FIGURES:
        cells = [fmt_cell(records, t, case, key, form) for t in ts]
        if all(c in ("—", "n/a") for c in cells):
            continue
        out.append(f"| {what} | {unit} | {better} | " + " | ".join(cells) + " |")

    base = [b for b in BASELINES if b in ts]
    mine = [t for t in ts if is_slipway(t)]
    if base and mine:
        out += ["", "## Ratios", "",
                "slipway transport ÷ baseline, computed per repetition (same repetition) and then "
                "the median taken. Throughput and conn/s: above 1 slipway is ahead. RTT: above 1 "
                "slipway is slower. Runs here vary by ±30 %; treat differences under ~1.3× as noise "
                "unless every repetition agrees (see the JSON).", ""]
        out += ["| | " + " | ".join(f"{w} ({u})" for _, _, w, u, _, _ in RATIO_FIGURES) + " |",
                "|---|" + "---:|" * len(RATIO_FIGURES)]
        for t in mine:
            for b in base:
                cells = [report.fmt_ratio(ratio(records, c, k, t, b)[0])
                         for c, k, _, _, _, _ in RATIO_FIGURES]
                out.append(f"| {labels[t]} ÷ {labels[b]} | " + " | ".join(cells) + " |")
    out += ["", "## Notes", ""]
    out += [f"- {n}" for n in notes] if notes else ["- none: every case ran, no stalls seen."]
    return "\n".join(out) + "\n"


def svg(records, meta):
    """Three panels of horizontal bars, one bar per transport: throughput,
    connection rate, latency."""
    ts = meta["transports"]
    labels = meta["labels"]
    col = colors(ts)
    panels = [
        ("Throughput, Gbit/s (longer is better)", [("g2h", "gbps", "TCP guest→host"),
                                                  ("h2g", "gbps", "TCP host→guest")], "{:.2f}", "Gbit/s"),
        ("Connections per second (longer is better)", [("crr", "cps", "connect+request+response")],
         "{:.0f}", "conn/s"),
        ("1-byte request/response latency, µs (shorter is better)",
         [("rr", "p50_us", "RTT p50"), ("rr", "p99_us", "RTT p99")], "{:.0f}", "µs"),
    ]
    width, label_w, bar_h, gap = 980, 230, 13, 10
    plot_w = width - label_w - 170
    parts = []
    y = 52
    for title, groups, form, unit in panels:
        data = []
        for case, key, glabel in groups:
            bars = []
            for t in ts:
                med, n, ran = cell(records, t, case, key)
                if ran == 0:
                    continue
                bars.append((t, med or 0.0, f"{form.format(med)} {unit}" if med is not None else "FAILED"))
            if bars:
                data.append((glabel, bars))
        if not data:
            continue
        top = max([v for _, bars in data for _, v, _ in bars] + [1e-9])
        step = _step(top)
        parts.append(f'<text x="10" y="{y}" font-size="15" font-weight="bold">{report._esc(title)}</text>')
        y += 14
        y0 = y
        for glabel, bars in data:
            parts.append(f'<text x="{label_w - 8}" y="{y + bar_h * len(bars) / 2 + 4:.0f}" '
                         f'text-anchor="end" font-size="12">{report._esc(glabel)}</text>')
            for t, v, text in bars:
                w = max(0.0, min(v / (step * int(top / step + 1)), 1.0)) * plot_w
                parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                             f'fill="{col[t]}"><title>{report._esc(labels[t])}: {report._esc(text)}'
                             f'</title></rect>')
                parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}" font-size="10" '
                             f'fill="#333">{report._esc(labels[t])}: {report._esc(text)}</text>')
                y += bar_h
            y += gap
        ticks = int(top / step + 1)
        for i in range(ticks + 1):
            x = label_w + i / ticks * plot_w
            parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y - gap}" stroke="#bbb" '
                         f'stroke-dasharray="3,3"/>')
            parts.append(f'<text x="{x:.1f}" y="{y + 4}" font-size="10" text-anchor="middle">'
                         f'{report._esc(_tick(i * step))}</text>')
        y += 30
    legend_x = 10
    for t in ts:
        parts.append(f'<rect x="{legend_x}" y="{y - 10}" width="12" height="12" fill="{col[t]}"/>')
        parts.append(f'<text x="{legend_x + 16}" y="{y}" font-size="12">{report._esc(labels[t])}</text>')
        legend_x += 16 + 7 * len(labels[t]) + 18
    y += 20
    parts.append(f'<text x="10" y="{y}" font-size="10" fill="#555">{report._esc(meta["date"])} · '
                 f'{report._esc(meta["host"])} · QEMU -M microvm guest, medians of {meta["reps"]} '
                 f'repetition(s) · bench/microvm/run</text>')
    y += 10
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
            f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="10" y="20" font-size="17" font-weight="bold">A microVM guest over slipway\'s '
            f'transports, passt and QEMU user networking</text>')
    return head + "".join(parts) + "</svg>\n"


def _step(top):
    """A round tick step giving at most ~8 ticks up to `top`."""
    for base in (0.01, 0.1, 1, 10, 100, 1000, 10000, 100000):
        for m in (1, 2, 2.5, 5):
            if top / (base * m) <= 8:
                return base * m
    return 1e6


def _tick(v):
    return f"{v:g}"
