#!/usr/bin/env python3
"""Turn scripts/bench.sh's raw fio JSON files into one Markdown table.

Files in --dir are NAME.TARGET.rROUND.json (fio --output-format=json) and NAME.TARGET.rROUND.ticks
(server CPU ticks, user+system, over ramp + runtime). Every figure is the median over rounds.
`--one FILE` prints a one-line summary of a single fio result (progress output).
"""
import argparse
import glob
import json
import os
import statistics
import sys

TARGETS = ("diskless", "tgt")


def load(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON document.
    return json.loads(text[text.index("{"):])


def job_figures(doc):
    """IOPS, bytes/s, and p50/p99 completion latency in µs of one fio job.

    Latency comes from reads for read and mixed jobs, from writes for write-only jobs."""
    job = doc["jobs"][0]
    rd, wr = job["read"], job["write"]
    iops = rd["iops"] + wr["iops"]
    bps = rd["bw_bytes"] + wr["bw_bytes"]
    side = rd if rd["total_ios"] > 0 else wr
    pct = side.get("clat_ns", {}).get("percentile", {})

    def p(key):
        v = pct.get(key)
        return v / 1000.0 if v is not None else float("nan")

    return {
        "iops": iops,
        "bps": bps,
        "p50": p("50.000000"),
        "p99": p("99.000000"),
        "client_cpu": job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0),
        "errors": job.get("error", 0),
        "runtime_s": job.get("job_runtime", 0) / 1000.0,
    }


def median(xs):
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else float("nan")


def fmt_int(x):
    return "n/a" if x != x else f"{x:,.0f}"


def fmt_f(x, digits=1):
    return "n/a" if x != x else f"{x:.{digits}f}"


def qd1_beside_pingpong(d):
    """Per round: (ratio, QD1 p50, ping-pong p50) of diskless's QD1 run and the mean of the
    two ping-pongs bench.sh took right before and right after it (NAME.TARGET.rN.ping)."""
    out = []
    for path in sorted(glob.glob(os.path.join(d, "randread-4k-qd1.diskless.r*.json"))):
        ping_path = path[:-len(".json")] + ".ping"
        if not os.path.exists(ping_path):
            continue
        with open(ping_path) as pf:
            pings = [float(x) for x in pf.read().split()]
        q = job_figures(load(path))["p50"]
        if pings and q == q:
            p = statistics.mean(pings)
            out.append((q / p, q, p))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--dir")
    ap.add_argument("--loopback-bps", type=float, default=0.0)
    ap.add_argument("--pingpong-us", type=float, default=0.0,
                    help="p50 round trip of a 48-byte TCP ping-pong on loopback (examples/pingpong.rs)")
    ap.add_argument("--clk-tck", type=float, default=100.0)
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--runtime", type=float, default=0.0)
    ap.add_argument("--ramp", type=float, default=0.0)
    ap.add_argument("--jobs", default="")
    a = ap.parse_args()

    if a.one:
        f = job_figures(load(a.one))
        print(f"{f['iops']:,.0f} IOPS, {f['bps'] / 2**20:,.1f} MiB/s, "
              f"p50 {f['p50']:.0f} us, p99 {f['p99']:.0f} us")
        return 0

    jobs = a.jobs.split() or sorted({os.path.basename(p).split(".")[0]
                                     for p in glob.glob(os.path.join(a.dir, "*.json"))})
    # Wall time the CPU ticks cover: fio's ramp plus runtime, as started by bench.sh.
    rows = []
    for job in jobs:
        per = {}
        by_round = {}
        for t in TARGETS:
            figs, cpu, cpu_per_io, mcpu_per_io = [], [], [], []
            for path in sorted(glob.glob(os.path.join(a.dir, f"{job}.{t}.r*.json"))):
                f = job_figures(load(path))
                figs.append(f)
                rnd = path[:-len(".json")].rsplit(".r", 1)[-1]
                by_round.setdefault(rnd, {})[t] = f["iops"]
                ticks_path = path[:-len(".json")] + ".ticks"
                if os.path.exists(ticks_path) and f["iops"] > 0:
                    with open(ticks_path) as tf:
                        secs = int(tf.read().strip()) / a.clk_tck
                    cpu.append(secs)
                    # A first-touch pass ends when the LUN is covered, without ramp: its
                    # own runtime is the wall time the ticks cover.
                    wall = (f["runtime_s"] if job.startswith("overlay-firsttouch")
                            else a.runtime + a.ramp)
                    if wall:
                        cpu_per_io.append(secs * 1e6 / (f["iops"] * wall))
                    mticks_path = path[:-len(".json")] + ".mticks"
                    if wall and os.path.exists(mticks_path):
                        with open(mticks_path) as mf:
                            msecs = int(mf.read().strip()) / a.clk_tck
                        mcpu_per_io.append(msecs * 1e6 / (f["iops"] * wall))
            if not figs:
                continue
            m = {k: median([f[k] for f in figs]) for k in ("iops", "bps", "p50", "p99", "client_cpu")}
            m["cpu_secs"] = median(cpu) if cpu else float("nan")
            # CPU per IO, assuming the ramp ran at the measured rate (fio excludes it).
            m["cpu_us_per_io"] = median(cpu_per_io) if cpu_per_io else float("nan")
            m["mcpu_us_per_io"] = median(mcpu_per_io) if mcpu_per_io else float("nan")
            per[t] = m
        ratios = sorted(v["diskless"] / v["tgt"] for v in by_round.values()
                        if v.get("tgt") and "diskless" in v)
        if per:
            rows.append((job, per, ratios))

    loop = a.loopback_bps / 8.0  # bytes/s
    out = []
    out.append(f"Rounds: {a.rounds}, {a.runtime:.0f} s per job and target; medians over rounds. "
               f"Loopback TCP ceiling (iperf3, one stream): "
               + (f"{loop / 2**20:,.0f} MiB/s." if loop else "not measured.")
               + " 48-byte TCP ping-pong on loopback, p50: "
               + (f"{a.pingpong_us:.1f} µs." if a.pingpong_us else "not measured."))
    out.append("")
    out.append("| job | target | IOPS | MiB/s | p50 µs | p99 µs | server CPU s | server CPU µs/IO | machine CPU µs/IO | diskless/tgt IOPS | share of loopback |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for job, per, ratios in rows:
        d, t = per.get("diskless"), per.get("tgt")
        ratio = (d["iops"] / t["iops"]) if d and t and t["iops"] else float("nan")
        for name in TARGETS:
            m = per.get(name)
            if not m:
                continue
            share = ""
            if loop and job.startswith("seqread"):
                share = f"{100.0 * m['bps'] / loop:.0f} %"
            out.append(
                f"| {job} | {name} | {fmt_int(m['iops'])} | {fmt_f(m['bps'] / 2**20)} | "
                f"{fmt_f(m['p50'], 0)} | {fmt_f(m['p99'], 0)} | {fmt_f(m['cpu_secs'])} | {fmt_f(m['cpu_us_per_io'])} | {fmt_f(m['mcpu_us_per_io'])} | "
                + (f"**{ratio:.2f}**" if name == "diskless" and ratio == ratio else "")
                + (f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if name == "diskless" and len(ratios) > 1
                   else "")
                + f" | {share} |")
    out.append("")
    med = {(job, t): m for job, per, _ in rows for t, m in per.items()}

    def ratio_line(label, num, den, goal, key="iops"):
        n, d = med.get(num), med.get(den)
        if n and d and d[key] and n[key] == n[key]:
            out.append(f"| {label} | {n[key] / d[key]:.2f}× | {goal} |")

    out.append("| ratio (medians of this run) | value | goal (issue 12) |")
    out.append("|---|---:|---:|")
    ratio_line("randwrite-4k-qd32: diskless / tgt", ("randwrite-4k-qd32", "diskless"),
               ("randwrite-4k-qd32", "tgt"), "≥ 1.5×")
    ratio_line("overlay first touch / plain image randwrite", ("overlay-firsttouch-4k-qd32", "diskless"),
               ("randwrite-4k-qd32", "diskless"), "≥ 0.8×")
    ratio_line("overlay rewrite / plain image randwrite", ("overlay-rewrite-4k-qd32", "diskless"),
               ("randwrite-4k-qd32", "diskless"), "≥ 0.9×")
    ratio_line("server CPU per write / per read (randwrite / randread qd32, diskless)",
               ("randwrite-4k-qd32", "diskless"), ("randread-4k-qd32", "diskless"), "≤ 3×",
               key="cpu_us_per_io")
    seq = med.get(("seqread-1m-qd16", "diskless"))
    if seq and loop:
        out.append(f"| seqread-1m-qd16 diskless / loopback TCP ceiling (iperf3, one stream) | "
                   f"{100.0 * seq['bps'] / loop:.0f} % | ≥ 85 % |")
    qd1 = med.get(("randread-4k-qd1", "diskless"))
    if qd1 and a.pingpong_us and qd1["p50"] == qd1["p50"]:
        out.append(f"| randread-4k-qd1 diskless p50 / 48-byte TCP ping-pong p50 (lowest of the run) | "
                   f"{qd1['p50'] / a.pingpong_us:.2f}× ({qd1['p50']:.0f} / {a.pingpong_us:.1f} µs) | ≤ 2× |")
    same = qd1_beside_pingpong(a.dir)
    if same:
        rs = sorted(r for r, _, _ in same)
        detail = ", ".join(f"{q:.0f}/{p:.1f}" for _, q, p in same)
        out.append(f"| randread-4k-qd1 diskless p50 / ping-pong p50 of the same minute "
                   f"(median of rounds; range; µs per round) | {median(rs):.2f}× "
                   f"({rs[0]:.2f}-{rs[-1]:.2f}; {detail}) | ≤ 2× |")
    out.append("")
    out.append("The overlay-* rows are diskless with a persistent overlay (`serve --overlay "
               "persistent`), fresh every round; their ratio column compares them with tgt's "
               "run of the same job name, which does not exist, so it is empty.")
    out.append("The ratio is of the median IOPS; in parentheses the lowest and highest ratio of "
               "one round's pair of runs.")
    out.append("Latency is fio's completion latency (clat) of reads, or of writes for write-only "
               "jobs. Server CPU s = user+system CPU time of the server process (all threads) "
               "during the job, ramp included; \"µs/IO\" divides it by IOPS x (runtime + ramp). "
               "CPU per IO is less sensitive to the machine's other load than IOPS. Machine CPU "
               "µs/IO is the same for the whole machine's busy time (/proc/stat: the server, fio "
               "and the kernel's writeback and journal work for them, the job's dirty pages synced "
               "before its end tick; idle and iowait excluded), "
               "meaningful only when nothing else runs.")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
