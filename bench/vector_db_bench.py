"""Benchmark MemoryVectorDB: add latency, search latency and recall@k of HNSW against exact search.

Data (``--data``; ``both`` runs structured first):

* ``structured`` (default): synthetic vectors shaped like sentence embeddings.  Cluster centres in
  a low-dimensional latent space, points = centre + Gaussian noise (each cluster its own spread,
  Zipf-like cluster sizes), mapped to ``--dim`` by a fixed random linear map, plus a common
  offset (the anisotropy of real embeddings) and a little isotropic noise, L2-normalised.  With
  the defaults a held-out query's top-1 cosine is ~0.75-0.95 and random pairs ~0.15 (printed).
* ``random``: uniformly random unit vectors, the worst case for HNSW (distances concentrate:
  the true top-10 are barely nearer than thousands of others), so its recall is a floor.

Query sets, ``--queries`` each: ``held_out`` (fresh draws from the same distribution, not stored)
and ``near_duplicate`` (stored vectors + noise of norm ``--noise``).  Recall@k is measured against
numpy exact search over the same vectors.  Every search goes through ``MemoryVectorDB.search``, one
query at a time, so latencies include the SQLite record fetch.

One index per (connectivity, expansion_add) is grown through ``--sizes``; at each size it is
reopened with each search setting (expansion_search and brute_force_max are search-time knobs).
Exact search (``brute_force_max`` above the size) scans the same index, so it shares its add time.
Sizes up to ``vector_db.EXACT_SEARCH_MAX`` would not measure the index at all: MemoryVectorDB
then scans the subset's rows in SQLite whatever the settings.

1. grid, first data kind only, at sizes <= ``--grid-n``: connectivity x expansion_search, HNSW
   only.  The tuned setting is the fastest (p50) whose recall on every query set is at least
   ``--pick-recall`` at ``--grid-n`` (a margin above the 0.99 target, as recall falls while the
   index grows), else the most accurate.  ``--grid-n 0`` skips it and tunes to the command line.
2. sweep: exact vs tuned HNSW at every size -> the crossover for ``DEFAULT_BRUTE_FORCE_MAX``.
3. at ``--n``: baseline (usearch defaults, HNSW) vs tuned (HNSW) vs exact.

    python3 -m bench.vector_db_bench --data both
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from memory import vector_db
from memory.schema import MemoryCandidate
from memory.vector_db import MemoryVectorDB

logger = logging.getLogger("bench.vector_db")
USEARCH_DEFAULTS = {"connectivity": 16, "expansion_add": 128, "expansion_search": 64}
EXACT = 2**62  # brute_force_max that makes every search exact
ADD_BATCH = 10_000
PAIR_SAMPLE = 20_000  # random pairs for the cosine statistics
SAMPLE_CHUNK = 50_000  # vectors generated at a time
RESULTS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "vector_db.json")

# Structured data.  Chosen so that cosine statistics resemble sentence embeddings (printed with
# the results): nearest-neighbour cosines mostly 0.75-0.95, random pairs centred near 0.15.
CLUSTERS = 2000
LATENT_DIM = 48
SPREAD = (0.35, 0.9)   # per-cluster noise std (log-uniform), centres are N(0, I)
ZIPF = 1.5             # cluster sizes ~ Zipf(1.5) capped at MAX_WEIGHT (a few big topics)
MAX_WEIGHT = 50
OFFSET_NORM = 0.5      # common offset, relative to a centre's norm
ISOTROPIC = 0.15       # full-dimensional noise, relative to a centre's norm

Setting = Tuple[int, int, int]  # connectivity, expansion_add, expansion_search


@dataclasses.dataclass
class Dataset:
    kind: str
    stored: np.ndarray  # (n, dim) unit rows; record id i + 1 holds row i
    queries: Dict[str, np.ndarray]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("structured", "random", "both"), default="structured")
    p.add_argument("--n", type=int, default=100_000, help="stored vectors at the final size")
    p.add_argument("--sizes", default="2500,3000,4000,5000,10000,20000,50000",
                   help="comma-separated sizes below --n for the exact/HNSW crossover")
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--queries", type=int, default=300, help="queries per query set")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.05,
                   help="noise norm for near-duplicate queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-n", type=int, default=20_000, help="size at which the grid picks; 0: "
                   "no grid, tune to --connectivity/--expansion-add/--expansion-search")
    p.add_argument("--grid-connectivity", default="16,32")
    p.add_argument("--grid-expansion-search", default="64,128,256,512")
    p.add_argument("--pick-recall", type=float, default=0.995)
    p.add_argument("--connectivity", type=int, default=vector_db.DEFAULT_CONNECTIVITY)
    p.add_argument("--expansion-add", type=int, default=vector_db.DEFAULT_EXPANSION_ADD)
    p.add_argument("--expansion-search", type=int, default=vector_db.DEFAULT_EXPANSION_SEARCH)
    p.add_argument("--json", default=RESULTS_JSON, help="output JSON path")
    args = p.parse_args()
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if 0 < int(s) < args.n} | {args.n})
    if 0 < args.grid_n and args.grid_n not in args.sizes:
        p.error(f"--grid-n {args.grid_n} must be one of --sizes or --n ({args.sizes})")
    args.grid_connectivity = [int(c) for c in args.grid_connectivity.split(",")]
    args.grid_expansion_search = [int(e) for e in args.grid_expansion_search.split(",")]
    return args


# ------------------------------------------------------------------------------------ data

def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def structured_sampler(rng: np.random.Generator, dim: int):
    """A function m -> (m, dim) unit vectors from one fixed clustered distribution."""
    centres = rng.standard_normal((CLUSTERS, LATENT_DIM))
    spread = np.exp(rng.uniform(np.log(SPREAD[0]), np.log(SPREAD[1]), CLUSTERS))
    weights = np.minimum(rng.zipf(ZIPF, CLUSTERS), MAX_WEIGHT).astype(np.float64)
    weights /= weights.sum()
    lift = rng.standard_normal((LATENT_DIM, dim)) / np.sqrt(dim)  # ~ isometry into dim
    offset = rng.standard_normal(dim)
    offset *= OFFSET_NORM * np.sqrt(LATENT_DIM) / np.linalg.norm(offset)

    def chunk(m: int) -> np.ndarray:
        c = rng.choice(CLUSTERS, size=m, p=weights)
        z = centres[c] + spread[c, None] * rng.standard_normal((m, LATENT_DIM))
        iso = ISOTROPIC * np.sqrt(LATENT_DIM / dim) * rng.standard_normal((m, dim))
        return unit_rows(z @ lift + offset + iso)

    def sample(m: int) -> np.ndarray:
        # in chunks: float64 temporaries for 1M x 576 at once would take ~15 GB
        return np.concatenate([chunk(min(SAMPLE_CHUNK, m - i)) for i in range(0, m, SAMPLE_CHUNK)] or
                              [np.zeros((0, dim), np.float32)])

    return sample


def make_data(kind: str, args) -> Dataset:
    rng = np.random.default_rng(args.seed)
    if kind == "structured":
        sample = structured_sampler(rng, args.dim)
    else:
        def sample(m: int) -> np.ndarray:
            return unit_rows(rng.standard_normal((m, args.dim)))
    stored, held_out = sample(args.n), sample(args.queries)
    picks = rng.choice(args.n, size=args.queries, replace=False)
    noise = unit_rows(rng.standard_normal((args.queries, args.dim)))
    near = unit_rows(stored[picks] + args.noise * noise)
    return Dataset(kind, stored, {"held_out": held_out, "near_duplicate": near})


def exact_top_k(stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the exact top-k by cosine (vectors are unit length)."""
    out = []
    for start in range(0, len(queries), 256):
        scores = queries[start:start + 256] @ stored.T
        out.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
    return np.concatenate(out)


def cosine_stats(data: Dataset, k: int, seed: int) -> dict:
    """Nearest-neighbour cosines of held-out queries and cosines of random stored pairs."""
    q = data.queries["held_out"]
    top = -np.sort(np.partition(-(q @ data.stored.T), k - 1, axis=1)[:, :k], axis=1)  # top-k, descending
    rng = np.random.default_rng(seed + 1)
    a, b = (data.stored[rng.integers(0, len(data.stored), PAIR_SAMPLE)] for _ in range(2))
    pairs = np.einsum("ij,ij->i", a, b)
    pct = lambda x, p: float(np.percentile(x, p))  # noqa: E731
    return {"top1_p5": pct(top[:, 0], 5), "top1_p50": pct(top[:, 0], 50),
            "top1_p95": pct(top[:, 0], 95), f"top{k}_p50": pct(top[:, k - 1], 50),
            "pair_mean": float(pairs.mean()), "pair_p5": pct(pairs, 5),
            "pair_p95": pct(pairs, 95)}


# ------------------------------------------------------------------------ build & search

class GrowingIndex:
    """One MemoryVectorDB directory, grown in steps; add time (SQLite + index) accumulates."""

    def __init__(self, directory: str, stored: np.ndarray, connectivity: int,
                 expansion_add: int):
        self.directory, self.stored = directory, stored
        self.build = {"connectivity": connectivity, "expansion_add": expansion_add}
        self.size, self.add_s = 0, 0.0

    def grow_to(self, n: int) -> None:
        if n <= self.size:
            return
        with MemoryVectorDB(self.directory, **self.build) as db:
            for start in tqdm(range(self.size, n, ADD_BATCH), unit="batch", disable=None,
                              desc=f"add {self.size}->{n} conn {self.build['connectivity']}"):
                batch = self.stored[start:min(n, start + ADD_BATCH)]
                cands = [MemoryCandidate(text=f"memory {start + i}", user_id="u")
                         for i in range(len(batch))]
                t0 = time.perf_counter()
                db.add(cands, batch, "bench-encoder", status="active")
                self.add_s += time.perf_counter() - t0
        self.size = n

    def measure(self, expansion_search: int, brute_force_max: int, queries: dict,
                truth: dict, k: int) -> dict:
        """Per-query latency (p50/p99 over all query sets) and recall@k per query set."""
        db = MemoryVectorDB(self.directory, **self.build, expansion_search=expansion_search,
                            brute_force_max=brute_force_max)
        out, latencies = {}, []
        with db:
            for name, qs in queries.items():
                found = 0
                for q, true_rows in zip(qs, truth[name]):
                    t0 = time.perf_counter()
                    hits = db.search(q, k=k)[0]
                    latencies.append(time.perf_counter() - t0)
                    found += len({h.record.id - 1 for h in hits} & set(true_rows.tolist()))
                out[f"recall_{name}"] = found / (k * len(qs))
        lat_ms = 1e3 * np.asarray(latencies)
        out["p50_ms"] = float(np.percentile(lat_ms, 50))
        out["p99_ms"] = float(np.percentile(lat_ms, 99))
        out["min_recall"] = min(v for key, v in out.items() if key.startswith("recall_"))
        return out


def pick_tuned(grid_rows: List[dict], pick_recall: float) -> Setting:
    """Fastest setting with min recall >= pick_recall, else the most accurate."""
    good = [r for r in grid_rows if r["min_recall"] >= pick_recall]
    best = min(good, key=lambda r: r["p50_ms"]) if good else \
        max(grid_rows, key=lambda r: (r["min_recall"], -r["p50_ms"]))
    return best["connectivity"], best["expansion_add"], best["expansion_search"]


def tuned_copies(rows: List[dict], tuned: Setting) -> List[dict]:
    """The grid rows of the picked setting, relabelled 'tuned' for the sweep."""
    return [dict(r, config="tuned") for r in rows if r["config"].startswith("grid")
            and (r["connectivity"], r["expansion_add"], r["expansion_search"]) == tuned]


def settings_at(size: int, args, tuned: Optional[Setting], grid: bool) -> Dict[str, Setting]:
    """name -> HNSW setting to measure at this size (exact is measured separately)."""
    out: Dict[str, Setting] = {}
    if grid and size <= args.grid_n:
        for c in args.grid_connectivity:
            for e in args.grid_expansion_search:
                out[f"grid c{c} e{e}"] = (c, args.expansion_add, e)
    if tuned is not None:
        out["tuned"] = tuned
    if size == args.n:
        out["baseline"] = tuple(USEARCH_DEFAULTS.values())
    return out


def measure_size(data: Dataset, size: int, settings: Dict[str, Setting],
                 builds: Dict[Tuple[int, int], GrowingIndex], args, root: str) -> List[dict]:
    """Grow the needed indexes to ``size``; one row for exact search and one per setting."""
    truth = {name: exact_top_k(data.stored[:size], q, args.k)
             for name, q in data.queries.items()}
    for c, ea, _ in settings.values():
        if (c, ea) not in builds:
            builds[(c, ea)] = GrowingIndex(os.path.join(root, f"{data.kind}_c{c}_a{ea}"),
                                           data.stored, c, ea)
        builds[(c, ea)].grow_to(size)
    first = next(iter(builds.values()))  # exact search ignores the graph: any index will do
    jobs = [("exact", (None, None, None), first, vector_db.DEFAULT_EXPANSION_SEARCH, EXACT)]
    jobs += [(name, s, builds[s[:2]], s[2], 0) for name, s in settings.items()]
    rows = []
    for name, setting, build, expansion_search, brute_force_max in jobs:
        r = build.measure(expansion_search, brute_force_max, data.queries, truth, args.k)
        logger.info("%s n=%d %s: %s", data.kind, size, name, r)
        rows.append(dict(r, add_s=build.add_s, size=size, config=name,
                         connectivity=setting[0], expansion_add=setting[1],
                         expansion_search=setting[2]))
    return rows


def run_kind(data: Dataset, args, tuned: Optional[Setting], root: str) -> dict:
    """Grid (when tuned is None), sweep and final comparison for one data kind."""
    grid = tuned is None
    builds: Dict[Tuple[int, int], GrowingIndex] = {}
    rows, grid_rows = [], []
    for size in args.sizes:
        rows += measure_size(data, size, settings_at(size, args, tuned, grid), builds, args,
                             root)
        if grid and size == args.grid_n:
            grid_rows = [r for r in rows if r["size"] == size and r["config"].startswith("grid")]
            tuned = pick_tuned(grid_rows, args.pick_recall)
            logger.info("%s: tuned setting %s", data.kind, tuned)
            rows += tuned_copies(rows, tuned)
            keep = {tuned[:2], tuple(USEARCH_DEFAULTS.values())[:2]}
            builds = {key: b for key, b in builds.items() if key in keep}
    return {"tuned": tuned, "rows": rows, "grid": grid_rows}


def crossover(rows: List[dict]) -> Optional[int]:
    """Largest size at which exact search measured no slower (p50) than tuned HNSW."""
    by_size: Dict[int, dict] = {}
    for r in rows:
        by_size.setdefault(r["size"], {})[r["config"]] = r
    for size in sorted(by_size, reverse=True):
        rs = by_size[size]
        if "tuned" in rs and rs["exact"]["p50_ms"] <= rs["tuned"]["p50_ms"]:
            return size
    return None


# -------------------------------------------------------------------------------- report

def stats_table(stats: dict, n: int, k: int) -> str:
    out = [f"| data | n | top-1 cos p5 / p50 / p95 (held-out) | top-{k} cos p50 "
           "| random pair cos mean (p5 / p95) |", "|---|---|---|---|---|"]
    for kind, s in stats.items():
        out.append(f"| {kind} | {n} | {s['top1_p5']:.3f} / {s['top1_p50']:.3f} / "
                   f"{s['top1_p95']:.3f} | {s[f'top{k}_p50']:.3f} | {s['pair_mean']:.3f} "
                   f"({s['pair_p5']:.3f} / {s['pair_p95']:.3f}) |")
    return "\n".join(out)


def _setting(r: dict) -> str:
    return "exact" if r["connectivity"] is None else \
        f"{r['connectivity']} / {r['expansion_add']} / {r['expansion_search']}"


def grid_table(kind: str, grid_rows: List[dict], exact: dict, k: int) -> str:
    out = [f"| data | n | conn / exp_add / exp_search | p50 ms | p99 ms | recall@{k} held-out "
           f"| recall@{k} near-dup | add s |", "|---|---|---|---|---|---|---|---|"]
    for r in grid_rows + [exact]:
        out.append(f"| {kind} | {r['size']} | {_setting(r)} | {r['p50_ms']:.2f} "
                   f"| {r['p99_ms']:.2f} | {r['recall_held_out']:.4f} "
                   f"| {r['recall_near_duplicate']:.4f} | {r['add_s']:.1f} |")
    return "\n".join(out)


def sweep_table(results: dict, k: int) -> str:
    out = [f"| data | n | exact p50 / p99 ms | tuned HNSW p50 / p99 ms | exact / HNSW p50 "
           f"| HNSW recall@{k} (min of sets) |", "|---|---|---|---|---|---|"]
    for kind, res in results.items():
        by_size: Dict[int, dict] = {}
        for r in res["rows"]:
            by_size.setdefault(r["size"], {})[r["config"]] = r
        for size, rs in sorted(by_size.items()):
            if "tuned" not in rs:
                continue
            e, t = rs["exact"], rs["tuned"]
            out.append(f"| {kind} | {size} | {e['p50_ms']:.2f} / {e['p99_ms']:.2f} "
                       f"| {t['p50_ms']:.2f} / {t['p99_ms']:.2f} "
                       f"| {e['p50_ms'] / t['p50_ms']:.2f} | {t['min_recall']:.4f} |")
    return "\n".join(out)


def final_table(results: dict, n: int, k: int) -> str:
    out = [f"| data | config | conn / exp_add / exp_search | add s (ms/vec) | p50 ms | p99 ms "
           f"| recall@{k} held-out | recall@{k} near-dup | p50 vs baseline |",
           "|---|---|---|---|---|---|---|---|---|"]
    for kind, res in results.items():
        rs = {r["config"]: r for r in res["rows"] if r["size"] == n}
        base = rs["baseline"]
        for name in ("baseline", "tuned", "exact"):
            r = rs[name]
            out.append(f"| {kind} | {name} | {_setting(r)} | {r['add_s']:.1f} "
                       f"({1e3 * r['add_s'] / n:.2f}) | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                       f"| {r['recall_held_out']:.4f} | {r['recall_near_duplicate']:.4f} "
                       f"| {r['p50_ms'] / base['p50_ms']:.2f}x |")
    return "\n".join(out)


def shipped_note(tuned: Setting, n: int) -> str:
    shipped = (vector_db.DEFAULT_CONNECTIVITY, vector_db.DEFAULT_EXPANSION_ADD,
               vector_db.DEFAULT_EXPANSION_SEARCH)
    bfm = vector_db.DEFAULT_BRUTE_FORCE_MAX
    mode = "exact" if n <= bfm else ("tuned" if shipped == tuple(tuned) else "NOT measured")
    return (f"memory.vector_db defaults: conn / exp_add / exp_search = "
            f"{' / '.join(map(str, shipped))}, brute_force_max = {bfm}: at n = {n} they run "
            f"the '{mode}' row.")


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args()
    kinds = ["structured", "random"] if args.data == "both" else [args.data]
    tuned: Optional[Setting] = None
    if args.grid_n == 0:
        tuned = (args.connectivity, args.expansion_add, args.expansion_search)
    results, stats, elapsed = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="vector_db_bench_") as root:
        for kind in kinds:
            t0 = time.perf_counter()
            data = make_data(kind, args)
            stats[kind] = cosine_stats(data, args.k, args.seed)
            logger.info("%s cosine statistics: %s", kind, stats[kind])
            results[kind] = run_kind(data, args, tuned, root)
            tuned = results[kind]["tuned"]  # later kinds reuse the first kind's pick
            elapsed[kind] = round(time.perf_counter() - t0)
    first = results[kinds[0]]
    exact_at_grid = [r for r in first["rows"] if r["size"] == args.grid_n
                     and r["config"] == "exact"]
    tables = [stats_table(stats, args.n, args.k)]
    if first["grid"]:
        tables.append(grid_table(kinds[0], first["grid"], exact_at_grid[0], args.k))
    tables += [sweep_table(results, args.k), final_table(results, args.n, args.k)]
    cross = crossover(first["rows"])
    notes = [f"tuned (picked on {kinds[0]}{' grid' if first['grid'] else ''}): "
             f"conn / exp_add / exp_search = {' / '.join(map(str, tuned))}",
             f"largest n where exact search measured no slower (p50) than tuned HNSW on "
             f"{kinds[0]}: {cross}",
             shipped_note(tuned, args.n),
             f"wall time (s): {elapsed}, {os.cpu_count()} cores"]
    text = "\n\n".join(tables + ["\n".join(notes)])
    print(text)
    write_json(args.json, {"args": vars(args), "cpu_count": os.cpu_count(), "stats": stats,
                           "results": results, "crossover_n": cross, "elapsed_s": elapsed,
                           "report": text})
    logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
