"""What a run reports: ratios to the baselines, the comparison with a previous run, the noise
check, ``results.md`` and the summary tables printed at the end (the plots: :mod:`.plots`).
"""
from __future__ import annotations

import statistics

from .baselines import BASELINE_LABEL, BASELINES


def ratios(results):
    """``{fastrnn impl: {baseline: baseline median / fastrnn median}}`` for one case."""
    out = {}
    for name, res in results.items():
        if not name.startswith("fastrnn-") or res.get("status") != "ok":
            continue
        out[name] = {b: results[b]["median_s"] / res["median_s"] for b in BASELINES
                     if results.get(b, {}).get("status") == "ok"}
    return out


def compare(previous, current):
    """Per case and implementation: previous and new median and the change (like
    ``pytest-benchmark compare``). Returns a list of dict rows."""
    old = {(c["id"], name): res["median_s"] for c in previous.get("cases", [])
           for name, res in c["results"].items() if res.get("status") == "ok"}
    rows = []
    for c in current["cases"]:
        for name, res in c["results"].items():
            if res.get("status") != "ok" or (c["id"], name) not in old:
                continue
            before = old[(c["id"], name)]
            rows.append({"case": c["id"], "impl": name, "previous_s": before,
                         "current_s": res["median_s"],
                         "change_pct": 100.0 * (res["median_s"] - before) / before})
    return rows


def _ms(seconds):
    if seconds is None:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _impl_label(name):
    return BASELINE_LABEL.get(name, name)


def noise_check(report):
    """How far ``fastrnn-native`` (torch.nn behind fastrnn's dispatch, the same computation)
    strays from torch.nn: a measure of the run's noise. None without both."""
    values = sorted(c["ratios"]["fastrnn-native"]["torch"] for c in report["cases"]
                    if "torch" in c["ratios"].get("fastrnn-native", {}))
    if not values:
        return None
    within = sum(0.9 <= v <= 1.1 for v in values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "within_10pct": within, "cases": len(values), "noisy": within < 0.8 * len(values)}


def _noise_line(noise):
    if noise is None:
        return "- noise check: needs the native backend and the torch.nn baseline"
    line = (f"- noise check: fastrnn-native / torch.nn (the same computation) median "
            f"{noise['median']:.2f}, range {noise['min']:.2f}–{noise['max']:.2f}, within ±10% in "
            f"{noise['within_10pct']}/{noise['cases']} cases")
    if noise["noisy"]:
        line += (" — **NOISY RUN: single ratios of this run are not reliable**; see the load "
                 "average (other processes on the cores stall torch's OpenMP threads; "
                 "`--threads 1` suffers less)")
    return line


def _input_kind(case):
    """The "input" column: packed, streamed (T calls of one step) or dense (empty)."""
    return "packed" if case["packed"] else "streamed" if case.get("stream") else ""


def markdown(report):
    """results.md: ratios per case and backend, then every timing."""
    cases = report["cases"]
    machine = report["machine"]
    fast = [n for n in report["config"]["impls"] if n.startswith("fastrnn-")]
    lines = [f"# fastrnn benchmark: {report['config']['grid']} grid on {machine['device']}", "",
             f"- machine: {machine['cpu_model']} ({machine.get('cpu_vendor')}, family/model "
             f"{machine.get('cpu_family_model')}; ISA {' '.join(machine.get('isa') or []) or '?'}; "
             f"BLAS {machine.get('blas')}), {machine['cpu_count']} cores, "
             f"torch threads {machine['torch_num_threads']}"
             + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
             f"- date {machine['date']}; wall time {report['wall_s']:.0f} s (CPU time of this "
             f"process {report.get('cpu_s', 0):.0f} s); load average at start "
             f"{machine.get('loadavg_start')}, at end {machine.get('loadavg_end')}"
             + (f"; **background load: {machine['background_load']} busy processes on the same "
                "CPUs while timing** (`--background-load`)" if machine.get("background_load")
                else ""),
             f"- GEMM peak (torch.mm {report['gemm_peak']['size']}², {report['gemm_peak']['dtype']}): "
             f"{report['gemm_peak']['gflops']:.1f} GFLOP/s",
             _noise_line(noise_check(report)), "",
             "**ratio = baseline time / fastrnn time** (median of interleaved rounds; > 1 means "
             "fastrnn is faster). `fastrnn-native` is torch.nn behind fastrnn's dispatch: its "
             "ratio to torch.nn shows the dispatch overhead and the run's noise level. "
             "`skip`: not run (see results.json for why); `✗`: output differs from torch.nn.", ""]
    groups = {}
    for c in cases:
        groups.setdefault((c["case"]["cell"], c["case"]["mode"], c["case"]["dtype"]), []).append(c)
    baselines = [b for b in BASELINES if b in report["config"]["impls"]]

    def cell_time(res, name):
        r = res.get(name, {})
        if r.get("status") == "ok":
            return _ms(r["median_s"])
        return {"wrong": "✗", "error": "error"}.get(r.get("status"), "skip")

    def cell_ratio(c, f, b):
        ratio = c["ratios"].get(f, {}).get(b)
        if ratio is not None:
            return f"{ratio:.2f}"
        return "✗" if c["results"].get(f, {}).get("status") == "wrong" else "–"

    for (cell, mode, dtype), group in groups.items():
        others = [b for b in baselines if b != "torch"
                  and any(g["results"].get(b, {}).get("status") == "ok" for g in group)]
        lines += [f"## {cell.upper()} {mode} ({dtype})", "",
                  "Times in ms; **×torch.nn** = torch.nn time / fastrnn time.", ""]
        head = ["T", "B", "H", "input", "torch.nn ms"]
        for f in fast:
            head += [f"{f} ms", f"{f} ×torch.nn"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in group:
            k, res = c["case"], c["results"]
            row = [str(k["seq_len"]), str(k["batch"]), str(k["hidden"]),
                   _input_kind(k), cell_time(res, "torch")]
            for f in fast:
                row += [cell_time(res, f), cell_ratio(c, f, "torch")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if others:
            lines += [f"Against the other baselines ({', '.join(_impl_label(b) for b in others)}):",
                      ""]
            head = ["T", "B", "H", "input"] + [f"{_impl_label(b)} ms" for b in others]
            head += [f"{f} ×{_impl_label(b)}" for f in fast for b in others]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for c in group:
                k, res = c["case"], c["results"]
                row = [str(k["seq_len"]), str(k["batch"]), str(k["hidden"]),
                       _input_kind(k)]
                row += [cell_time(res, b) for b in others]
                row += [cell_ratio(c, f, b) for f in fast for b in others]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    lines += ["## Every timing", "",
              "median / IQR / first call (compile + first touch) in ms; GFLOP/s from the GEMM "
              "count (`Case.flops`) over the median, and its share of the GEMM peak; peak memory "
              f"({report['config']['memory']}) in MiB; max err: max |out − torch.nn| (float32), "
              "‖out − ref‖/‖ref‖ against torch.nn in float32 (bfloat16/float16).", "",
              "| case | impl | status | median ms | IQR ms | first ms | repeats | GFLOP/s | % peak "
              "| peak MiB | max err | note |", "|" + "---|" * 12]
    for c in cases:
        peak = ((report.get("gemm_peak_bf16") if c["case"]["dtype"] == "bfloat16" else None)
                or report["gemm_peak"])["gflops"]
        for name, r in c["results"].items():
            if r.get("status") in ("ok", "wrong"):
                gf = c["flops"] / r["median_s"] / 1e9 if r.get("median_s") else None
                mem = r.get("peak_mem_bytes")
                err = r.get("max_abs_err", r.get("rel_err"))
                lines.append(
                    f"| {c['id']} | {name} | {r['status']} | {_ms(r.get('median_s'))} | "
                    f"{_ms(r.get('iqr_s'))} | {_ms(r.get('first_call_s'))} | {r.get('repeats')} | "
                    f"{gf:.2f} | {100 * gf / peak:.1f} | "
                    f"{'–' if mem is None else f'{mem / 2**20:.1f}'} | "
                    f"{'' if err is None else f'{err:.1e}'} | {r.get('reason', '')} |")
            else:
                lines.append(f"| {c['id']} | {name} | {r['status']} | | | | | | | | | "
                             f"{r.get('reason', '')} |")
    if report.get("comparison") is not None:
        lines += ["", "## Change against the previous run", "",
                  f"previous: {report.get('previous_date')}; change = (new − previous) / previous "
                  "of the median.", "",
                  "| case | impl | previous ms | new ms | change |", "|---|---|---|---|---|"]
        for row in report["comparison"]:
            lines.append(f"| {row['case']} | {row['impl']} | {_ms(row['previous_s'])} | "
                         f"{_ms(row['current_s'])} | {row['change_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def _print_summary(console, report):
    from rich.table import Table
    fast = [n for n in report["config"]["impls"] if n.startswith("fastrnn-")]
    table = Table(title="speed-up over torch.nn = torch.nn time / fastrnn time (> 1: fastrnn "
                        "faster); all baselines in results.md")
    table.add_column("case")
    table.add_column("torch.nn ms", justify="right")
    for f in fast:
        table.add_column(f.replace("fastrnn-", ""), justify="right")
    for c in report["cases"]:
        torch_res = c["results"].get("torch", {})
        row = [c["id"], _ms(torch_res.get("median_s"))]
        for f in fast:
            r = c["ratios"].get(f, {}).get("torch")
            status = c["results"].get(f, {}).get("status")
            row.append(f"{r:.2f}" if r is not None else {"wrong": "✗", "error": "error"}.get(status, "–"))
        table.add_row(*row)
    console.print(table)
    if report.get("comparison"):
        cmp = Table(title=f"change against the previous run ({report.get('previous_date')})")
        for col in ("case", "impl", "previous ms", "new ms", "change"):
            cmp.add_column(col, justify="left" if col in ("case", "impl") else "right")
        for row in report["comparison"]:
            pct = row["change_pct"]
            color = "red" if pct > 5 else "green" if pct < -5 else "white"
            cmp.add_row(row["case"], row["impl"], _ms(row["previous_s"]), _ms(row["current_s"]),
                        f"[{color}]{pct:+.1f}%")
        console.print(cmp)
    console.print(_noise_line(noise_check(report))[2:].replace("**", ""))
    console.print(f"wall time {report['wall_s']:.0f} s, CPU time {report['cpu_s']:.0f} s; "
                  f"load average {report['machine']['loadavg_start']} at start, "
                  f"{report['machine']['loadavg_end']} at end")
