"""`compllm task=serve` under open-loop Poisson load: (a) online (max_concurrent > 1: requests share the running
plan and the model's engine batch) vs (b) one at a time (max_concurrent=1: each request has the pipe to itself).

    PYTHONPATH=. .venv/bin/python experiments/bench_serve.py [--model smollm2-135m] [--rates 4,12,30]
                                                            [--count 6] [--max-seconds 240] [--concurrency 8]

For each mode a real server is started on 127.0.0.1 (a subprocess; the default model config unless --model),
warmed up with one request, and then: `--unloaded` requests sent one after another (latency with nothing else
in the pipe), and for each arrival rate (requests/min) `--count` streamed requests whose arrival times are a
seeded Poisson process (exponential gaps) sent whether or not earlier ones have finished (open loop), each
request stopped at `--max-seconds` after the rate's first arrival. Questions are distinct two-part questions
(no two requests share a part, so deduplication does not flatter the online mode).

Per rate: throughput = answered requests / (last answer - first arrival) in requests/min; p50/p95/p99 latency
(arrival -> last byte) and time to first token (arrival -> first content chunk), answered requests only.
Saturation = the highest rate. `summary.throughput_ratio` = online / one-at-a-time requests/min at saturation;
`summary.p50_ratio` = online p50 at saturation / one-at-a-time unloaded p50.

Results go to experiments/results/bench_serve.json after every rate (a rerun with the same settings resumes), then
bench_serve.md (with the command) and bench_serve.png (latency vs rate).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from compllm.serve.launch import ServerProcess  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
NAME = "compllm-team"
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Egypt", "Chile", "India", "Spain",
             "Peru", "Italy", "Ghana", "Nepal", "Poland", "Cuba", "Iran", "Mali", "Laos", "Fiji"]


def questions(n: int, offset: int) -> list[str]:
    """Distinct two-part questions: the capital of a country and a percentage (seeded by their position)."""
    return [f"What is the capital of {COUNTRIES[(offset + i) % len(COUNTRIES)]}? And what is "
            f"{5 + (offset + i) % 19 * 5}% of {40 + (offset + i) * 7}?" for i in range(n)]


def one_request(url: str, question: str, arrival: float, stop_at: float) -> dict[str, Any]:
    """Stream one chat completion; times from its arrival (perf_counter)."""
    out: dict[str, Any] = {"status": 0, "latency": None, "ttft": None}
    body = {"model": NAME, "messages": [{"role": "user", "content": question}], "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(max(1.0, stop_at - time.perf_counter()))) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if time.perf_counter() > stop_at:
                    out["status"] = "stopped"
                    break
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    out["status"] = data["error"].get("code") or "error"
                elif out["ttft"] is None and any((c.get("delta") or {}).get("content") for c in data["choices"]):
                    out["ttft"] = time.perf_counter() - arrival
        if out["status"] == 200:
            out["latency"] = time.perf_counter() - arrival
            out["answered_at"] = time.perf_counter()
    except httpx.HTTPError as exc:
        out["status"] = type(exc).__name__
    return out


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(rows: list[dict[str, Any]], start: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == 200]
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok if r["ttft"] is not None]
    span = max((r["answered_at"] for r in ok), default=start) - start
    out = {"sent": len(rows), "answered": len(ok), "statuses": sorted({str(r["status"]) for r in rows}),
           "throughput_rpm": round(len(ok) / span * 60, 2) if ok and span > 0 else 0.0}
    for name, values in (("latency", lat), ("ttft", ttft)):
        for q in (0.5, 0.95, 0.99):
            v = percentile(values, q)
            out[f"{name}_p{int(q * 100)}"] = round(v, 3) if v is not None else None
    return out


def run_rate(url: str, rate_per_min: float, count: int, max_seconds: float, seed: int, offset: int) -> dict:
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate_per_min / 60.0) for _ in range(count)]
    rows: list[dict[str, Any]] = [{} for _ in range(count)]
    start = time.perf_counter()
    stop_at = start + max_seconds
    threads, at = [], start
    for i, (gap, q) in enumerate(zip(gaps, questions(count, offset))):
        at = at + gap if i else start
        time.sleep(max(0.0, at - time.perf_counter()))
        t = threading.Thread(target=lambda i=i, q=q, a=at: rows.__setitem__(i, one_request(url, q, a, stop_at)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return stats(rows, start)


def unloaded(url: str, n: int, offset: int, max_seconds: float) -> dict:
    rows = []
    start = time.perf_counter()
    for q in questions(n, offset):
        rows.append(one_request(url, q, time.perf_counter(), time.perf_counter() + max_seconds))
    return stats(rows, start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a conf/model option (default: the config's default model)")
    ap.add_argument("--rates", default="4,12,30", help="arrival rates, requests per minute")
    ap.add_argument("--count", type=int, default=6, help="requests per rate")
    ap.add_argument("--unloaded", type=int, default=3, help="one-at-a-time requests with nothing else running")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="per rate: requests still open are stopped")
    ap.add_argument("--concurrency", type=int, default=8, help="online mode: serve.max_concurrent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "bench_serve"))
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model, "rates": rates, "count": args.count, "unloaded": args.unloaded,
                "max_seconds": args.max_seconds, "concurrency": args.concurrency, "seed": args.seed}
    path = out.with_suffix(".json")
    saved = json.loads(path.read_text()) if path.exists() else {}
    results = saved if saved.get("settings") == settings else {"settings": settings, "modes": {}}
    results["command"] = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    results["load_before"] = os.getloadavg()

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))

    modes = {"online": [f"serve.max_concurrent={args.concurrency}", "serve.max_queue=256"],
             "one_at_a_time": ["serve.max_concurrent=1", "serve.max_queue=256"]}
    for mode, overrides in modes.items():
        done = results["modes"].setdefault(mode, {})
        wanted = ["unloaded"] * (mode == "one_at_a_time") + [f"{r:g}" for r in rates]
        if all(k in done for k in wanted):
            continue
        extra = [f"model={args.model}"] if args.model else []
        log = Path(tempfile.mkdtemp(prefix=f"bench_serve_{mode}_")) / "server.log"
        server = ServerProcess([*extra, *overrides, "serve.api_key_env=null", "serve.request_timeout_s=600"], log)
        server.start()
        try:
            one_request(server.url, "What is 1 + 1?", time.perf_counter(), time.perf_counter() + 300)  # warm-up
            offset = 0
            for key in wanted:
                offset += 100
                if key in done:
                    continue
                if key == "unloaded":
                    done[key] = unloaded(server.url, args.unloaded, offset, args.max_seconds)
                else:
                    done[key] = {"rate_per_min": float(key), **run_rate(server.url, float(key), args.count,
                                                                        args.max_seconds, args.seed, offset)}
                print(mode, key, done[key], flush=True)
                save()
        finally:
            server.stop()
    results["load_after"] = os.getloadavg()
    saturation = f"{max(rates):g}"
    online, single = results["modes"]["online"][saturation], results["modes"]["one_at_a_time"]
    results["summary"] = {
        "saturation_rate_per_min": max(rates),
        "online_throughput_rpm": online["throughput_rpm"], "one_at_a_time_throughput_rpm":
            single[saturation]["throughput_rpm"],
        "throughput_ratio": ratio(online["throughput_rpm"], single[saturation]["throughput_rpm"]),
        "online_p50_at_saturation_s": online["latency_p50"],
        "one_at_a_time_unloaded_p50_s": single["unloaded"]["latency_p50"],
        "p50_ratio": ratio(online["latency_p50"], single["unloaded"]["latency_p50"]),
    }
    save()
    write_markdown(results, out.with_suffix(".md"))
    plot(results, rates, out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=2))


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def write_markdown(results: dict, path: Path) -> None:
    s = results["settings"]
    lines = [f"# bench_serve: online vs one at a time ({s['model'] or 'default model'})", "",
             f"Command: `{results['command']}`", "",
             f"{s['count']} requests per rate, open-loop Poisson arrivals (seed {s['seed']}), streamed; load average "
             f"before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f} (shared machine).", "",
             "| mode | rate (req/min) | answered | throughput (req/min) | p50 s | p95 s | p99 s | TTFT p50 s "
             "| TTFT p95 s |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in results["modes"].items():
        for key, r in rows.items():
            lines.append(f"| {mode} | {key} | {r['answered']}/{r['sent']} | {r['throughput_rpm']} | {r['latency_p50']} "
                         f"| {r['latency_p95']} | {r['latency_p99']} | {r['ttft_p50']} | {r['ttft_p95']} |")
    sm = results["summary"]
    lines += ["", f"At saturation ({sm['saturation_rate_per_min']:g} req/min): throughput ratio (online / one at a "
                  f"time) **{sm['throughput_ratio']}**; p50 ratio (online at saturation / one at a time unloaded) "
                  f"**{sm['p50_ratio']}**.", ""]
    path.write_text("\n".join(lines))


def plot(results: dict, rates: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, rows in results["modes"].items():
        for q, style in (("latency_p50", "-o"), ("latency_p95", "--x")):
            ys = [rows[f"{r:g}"][q] for r in rates]
            ax.plot(rates, ys, style, label=f"{mode} {q.split('_')[1]}")
    ax.set_xlabel("arrival rate (requests/min)")
    ax.set_ylabel("latency (s)")
    ax.set_title(f"compllm task=serve, {results['settings']['model'] or 'default model'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
