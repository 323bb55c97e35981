"""CPU kernel throughput against the copy bandwidth (the issue's targets).

    PYTHONPATH=. python bench/cpu_throughput.py --threads 1 --shapes 4096x1000,8192x32000

Per shape and thread count, round-robin over the cases (interleaved), each call on the next of
several input copies that together exceed the last-level cache, median of the repeats:
  copy        dst.copy_(src) of an N x C fp32 tensor (bandwidth = 2 N C 4 bytes / time)
  ce          ak.policy_loss(x, y, backend="cpu") + backward
  nn.CE       nn.CrossEntropyLoss()(x, y) + backward
  aepg        ak.aepg_loss(x, y, alpha=tensor(0.5), entropy_weight=0.1, backend="cpu") + backward
  lean        the lean eager composite of aEPG + entropy + backward
  lean.compile  torch.compile of it + backward
  ce.fwd / aepg.fwd   forward only (no grad), bf16 variants with --bf16
"""
import argparse
import json
import statistics
import time

import torch

import aepg_kernels as ak


def lean(x, y, alpha, beta=0.1):
    logp = x.log_softmax(-1)
    lp_y = logp.gather(1, y[:, None]).squeeze(1)
    p = logp.exp()
    p_y = lp_y.exp()
    H = -(p * logp).sum(-1)
    return (alpha * (-lp_y) + (1 - alpha) * (1 - p_y) + beta * H).mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x1000,8192x32000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default="copy,ce,nn.CE,aepg,lean,lean.compile,ce.fwd,aepg.fwd")
    ap.add_argument("--bf16", action="store_true", help="also bf16 ce/aepg fwd+bwd and fwd")
    ap.add_argument("--cache-mib", type=int, default=640, help="the input copies cover at least this")
    ap.add_argument("--reps", type=int, default=0, help="rounds (0: by size)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# aepg_kernels from {ak.__file__}, threads {torch.get_num_threads()}, "
          f"isa {ak._native._C.cpu_capability() if hasattr(ak._native._C, 'cpu_capability') else '?'}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = []
    for shape in args.shapes.split(","):
        n, c = map(int, shape.split("x"))
        nbytes = n * c * 4
        copies = max(2, -(-args.cache_mib * 2**20 // nbytes))
        reps = args.reps or (15 if nbytes < 2**26 else 5)
        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(n, c, generator=g) * 3 for _ in range(copies)]
        y = torch.randint(0, c, (n,), generator=g)
        dsts = [torch.empty(n, c) for _ in range(min(copies, 3))]
        alpha = torch.tensor(0.5)
        cases = args.cases.split(",")
        if args.bf16:
            cases += ["ce.bf16", "aepg.bf16", "ce.fwd.bf16", "aepg.fwd.bf16"]
        xb = [x.bfloat16() for x in xs] if args.bf16 else None
        compiled = torch.compile(lean) if "lean.compile" in cases else None
        state = {"i": 0}

        def nxt(bf16=False):
            state["i"] += 1
            pool = xb if bf16 else xs
            return pool[state["i"] % len(pool)]

        def fb(fn, bf16=False):
            def run():
                x = nxt(bf16).requires_grad_(True)
                fn(x).backward()
                x.grad = None
                x.requires_grad_(False)
            return run

        def fwd(fn, bf16=False):
            def run():
                with torch.no_grad():
                    fn(nxt(bf16))
            return run

        ce = lambda x: ak.policy_loss(x, y, backend="cpu")
        ae = lambda x: ak.aepg_loss(x, y, alpha=alpha, entropy_weight=0.1, backend="cpu")
        nce = torch.nn.CrossEntropyLoss()

        def copy():
            dsts[state["i"] % len(dsts)].copy_(nxt())

        table = {
            "copy": copy,
            "ce": fb(ce), "nn.CE": fb(lambda x: nce(x, y)), "aepg": fb(ae),
            "lean": fb(lambda x: lean(x, y, alpha)), "lean.compile": fb(lambda x: compiled(x, y, alpha)),
            "ce.fwd": fwd(ce), "aepg.fwd": fwd(ae),
            "ce.bf16": fb(ce, True), "aepg.bf16": fb(ae, True),
            "ce.fwd.bf16": fwd(ce, True), "aepg.fwd.bf16": fwd(ae, True),
        }
        times = {k: [] for k in cases}
        for k in cases:  # warm-up (compiles)
            for _ in range(2):
                table[k]()
        for _ in range(reps):
            for k in cases:
                t0 = time.perf_counter()
                table[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        bw = 2 * nbytes / med["copy"] if "copy" in med else float("nan")
        print(f"{shape} threads={args.threads} copies={copies} reps={reps} copy bw {bw / 1e9:.1f} GB/s")
        for k in cases:
            t = med[k]
            gbs = 2 * nbytes / t / 1e9 if "bf16" not in k else float("nan")
            extra = ""
            if k == "ce" and "nn.CE" in med:
                extra = f"  x{med['nn.CE'] / t:.2f} vs nn.CE"
            if k == "aepg":
                if "lean" in med:
                    extra += f"  x{med['lean'] / t:.2f} vs lean"
                if "lean.compile" in med:
                    extra += f"  x{med['lean.compile'] / t:.2f} vs compile"
            pct = 100 * gbs * 1e9 / bw if "bf16" not in k else float("nan")
            print(f"  {k:14s} {t * 1e3:9.2f} ms  {gbs:6.1f} GB/s  {pct:5.1f}% copy{extra}"
                  f"   [min {min(times[k]) * 1e3:.2f} max {max(times[k]) * 1e3:.2f}]", flush=True)
            results.append(dict(shape=shape, threads=args.threads, case=k, ms=t * 1e3, gbs=gbs, pct_copy=pct))
        del xs, xb, dsts
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
