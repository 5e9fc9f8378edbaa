"""Round-time overhead of secure aggregation (Flower's SecAgg+) on a 3-node loopback federation.

    MIRA_THREADS=1 python benchmarks/secagg_bench.py [--rounds 3] [--repeats 2] [--cold]

One SuperLink and 3 SuperNodes on 127.0.0.1 (insecure; ``--warm`` workers unless ``--cold``) run
fedit on ``flower_bench``'s workload, alternately without and with ``privacy.secure_aggregation``
(Flower's defaults), ``--repeats`` times each. The round time is the server's (``rounds.json``
``round_time_s``: from sampling to the aggregated round, the same definition as ``mira run``);
for SecAgg+ rounds also each stage's time and Flower payload bytes (``secure_aggregation.stages``).
Prints a table and writes ``benchmarks/results/secagg.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MIRA_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from flower_bench import CFG, K, machine  # noqa: E402


def run(fed, raw: dict, out: Path) -> dict:
    from mira.federated.flower import bundle
    from mira.federated.flower.settings import RunSettings

    t0 = time.perf_counter()
    run_id = fed.submit(bundle.config_text(raw), RunSettings(out_dir=str(out)))
    info = fed.wait(run_id, timeout=3600)
    if info["status"] != "finished:completed":
        raise RuntimeError(f"run failed: {info}\n{fed.logs(run_id)[-3000:]}")
    rounds = json.loads((out / "rounds.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {"run_total_s": time.perf_counter() - t0, "round_s": [e["round_time_s"] for e in rounds],
            "stages": [e["secure_aggregation"]["stages"] for e in rounds if "secure_aggregation" in e],
            "fit_bytes_per_client_round": (summary["flower"]["fit_bytes_down"] + summary["flower"]["fit_bytes_up"])
            / (K * len(rounds)), "fit_messages": summary["flower"]["fit_messages"],
            "adapter_bytes": summary["adapter_bytes"], "mean_local_test_loss": summary["mean_local_test_loss"]}


def main(argv=None) -> int:
    from mira.federated.flower.launch import LocalFederation

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="Flower's default ClientApps (no warm workers)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "secagg.json"))
    args = ap.parse_args(argv)
    raw = copy.deepcopy(CFG)
    raw["algorithm"] = {"name": "fedit"}
    raw["federation"]["rounds"] = raw["eval"]["every"] = args.rounds
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="mira-secagg-bench-"))
    res: dict[str, list] = {"plain": [], "secagg": []}
    fed = LocalFederation(tmp / "fed")
    try:
        fed.start_superlink()
        fed.start_supernodes(K, warm=not args.cold)
        for i in range(args.repeats):
            for mode in ("plain", "secagg"):
                cfg = copy.deepcopy(raw)
                if mode == "secagg":
                    cfg["privacy"] = {"secure_aggregation": {}}
                r = run(fed, cfg, tmp / f"{mode}{i}")
                res[mode].append(r)
                print(f"{mode} #{i}: rounds {[f'{x:.1f}' for x in r['round_s']]} s", flush=True)
    finally:
        left = fed.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, left
    info["loadavg_end"] = os.getloadavg()

    rows = {}
    for mode, rs in res.items():
        rounds = [x for r in rs for x in r["round_s"]]
        rows[mode] = {"mean_round_s": statistics.mean(rounds), "median_round_s": statistics.median(rounds),
                      "min_round_s": min(rounds), "max_round_s": max(rounds), "rounds": rounds,
                      "fit_bytes_per_client_round": rs[0]["fit_bytes_per_client_round"],
                      "fit_messages_per_round": rs[0]["fit_messages"] / args.rounds,
                      "mean_local_test_loss": [r["mean_local_test_loss"] for r in rs]}
    stages: dict[str, dict] = {}
    for r in res["secagg"]:
        for rnd in r["stages"]:
            for s in rnd:
                d = stages.setdefault(s["stage"], {"time_s": [], "bytes_down": [], "bytes_up": []})
                for key in d:
                    d[key].append(s[key])
    stage_rows = {name: {"mean_time_s": statistics.mean(d["time_s"]), "bytes_down_per_node":
                         statistics.mean(d["bytes_down"]) / K, "bytes_up_per_node": statistics.mean(d["bytes_up"]) / K}
                  for name, d in stages.items()}
    overhead = rows["secagg"]["mean_round_s"] - rows["plain"]["mean_round_s"]
    doc = {"command": "MIRA_THREADS=1 python benchmarks/secagg_bench.py " + " ".join(argv or sys.argv[1:]),
           "machine": info, "config": raw, "clients": K, "warm": not args.cold, "adapter_bytes":
           res["plain"][0]["adapter_bytes"], "results": rows, "secagg_stages": stage_rows,
           "overhead_s": overhead, "overhead_ratio": rows["secagg"]["mean_round_s"] / rows["plain"]["mean_round_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")

    print(f"\n{'mode':8} {'mean round s':>12} {'median':>7} {'min':>6} {'max':>6} {'fit B/client/round':>19} "
          f"{'msgs/round':>10}")
    for mode, r in rows.items():
        print(f"{mode:8} {r['mean_round_s']:12.2f} {r['median_round_s']:7.2f} {r['min_round_s']:6.2f} "
              f"{r['max_round_s']:6.2f} {r['fit_bytes_per_client_round']:19.0f} {r['fit_messages_per_round']:10.0f}")
    print(f"overhead: +{overhead:.2f} s per round (x{doc['overhead_ratio']:.2f})")
    for name, s in stage_rows.items():
        print(f"  {name:24} {s['mean_time_s']:6.2f} s  down {s['bytes_down_per_node']:8.0f} B  "
              f"up {s['bytes_up_per_node']:8.0f} B per node")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
