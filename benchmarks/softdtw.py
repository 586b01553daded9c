"""Soft-DTW timing table: our backends against pysdtw and tslearn, side by side in one run.

For each size (B pairs of N x M frames, D features, gamma) it prints the median time of one soft-DTW
term forward, its backward, the full divergence (three terms) forward + backward, and the peak memory
of the divergence step (CUDA: ``max_memory_allocated``; CPU: sampled peak RSS growth with large
blocks mmap-ed so that freed memory leaves RSS), then the ratio
of each peer's divergence time to our fastest backend. CPU times are medians of ``--repeats`` runs;
CUDA times use ``triton.testing.do_bench`` (median).

Peers run only when installed (``pip install -e '.[bench]'``). tslearn (``SoftDTWLossPyTorch``, the
per-pair numba path of the official LASER code) is timed on ``--tslearn-pairs`` pairs and scaled to B.

    python benchmarks/softdtw.py --quick                 # a few seconds
    python benchmarks/softdtw.py                         # the full table (CPU: long)
    python benchmarks/softdtw.py --sizes 500 875 --ratios 1.25 --repeats 3
"""

from __future__ import annotations

import argparse
import os

import torch
from measure import PeakMemory, exact_cpu_rss, median_ms

from s3prl_laser.softdtw import soft_dtw, soft_dtw_divergence

SIZES = (50, 250, 500, 875, 1250, 1750)  # N frames; M = N / 0.8, N, N / 1.2 (speed factors)
RATIOS = (1 / 0.8, 1.0, 1 / 1.2)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="N values")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="M / N values")
    parser.add_argument("--batch", type=int, default=8, help="pairs per batch (B)")
    parser.add_argument("--dim", type=int, default=256, help="feature size (D)")
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (CPU medians)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="ours to time (default: triton and cpu on a GPU machine, cpu otherwise)")
    parser.add_argument("--peers", nargs="*", default=["pysdtw", "tslearn"],
                        help="peers to time when installed (none: --peers with no value)")
    parser.add_argument("--tslearn-pairs", type=int, default=1, help="pairs timed for tslearn, scaled to B")
    parser.add_argument("--tslearn-max-n", type=int, default=875, help="skip tslearn above this N (slow)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-length batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (also the CPU kernel's threads); default: torch's")
    parser.add_argument("--quick", action="store_true", help="N=50 only, 1 repeat: a smoke run")
    return parser


def make_batch(args, n: int, m: int, mixed: bool, device: torch.device):
    """L2-normalised random frames (like LASER's projections) and per-pair lengths (mixed: 55-100 %)."""
    g = torch.Generator().manual_seed(n * 7919 + m)
    x = torch.nn.functional.normalize(torch.randn(args.batch, n, args.dim, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(args.batch, m, args.dim, generator=g), dim=-1)
    x_len = y_len = None
    if mixed:
        frac = torch.linspace(0.55, 1.0, args.batch)
        x_len = (frac * n).long().clamp_min(1)
        y_len = (frac.flip(0) * m).long().clamp_min(1)
    return x.to(device), y.to(device), x_len, y_len


def time_ours(backend: str, x, y, x_len, y_len, args, device) -> dict[str, float]:
    if backend == "cpu":  # the CPU kernel takes CPU tensors, also on a GPU machine
        device, x, y = torch.device("cpu"), x.cpu(), y.cpu()
    kw = dict(gamma=args.gamma, x_lengths=x_len, y_lengths=y_len, backend=backend)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()

    def forward():
        return soft_dtw(xg, yg, **kw)

    def backward_once():
        out = forward()
        return lambda: torch.autograd.grad(out, (xg, yg), torch.ones_like(out), retain_graph=True)

    def divergence():
        out = soft_dtw_divergence(xg, yg, **kw)
        torch.autograd.grad(out.sum(), (xg, yg))

    return _measure(forward, backward_once, divergence, args, device)


def _measure(forward, backward_once, divergence, args, device) -> dict[str, float]:
    fwd = median_ms(forward, device, args.repeats)
    bwd = median_ms(backward_once(), device, args.repeats)
    with PeakMemory(device) as mem:
        div = median_ms(divergence, device, args.repeats)
    return {"fwd": fwd, "bwd": bwd, "div": div, "mem": mem.peak / 2**20}


def time_pysdtw(x, y, x_len, y_len, args, device) -> dict[str, float]:
    import pysdtw

    sdtw = pysdtw.SoftDTW(gamma=args.gamma, use_cuda=device.type == "cuda")
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    pack = torch.nn.utils.rnn.pack_padded_sequence

    def inputs(a, a_len):
        return a if a_len is None else pack(a, a_len, batch_first=True, enforce_sorted=False)

    def forward():
        return sdtw(inputs(xg, x_len), inputs(yg, y_len))

    def backward_once():
        out = forward()
        return lambda: torch.autograd.grad(out, (xg, yg), torch.ones_like(out), retain_graph=True)

    def divergence():
        xs, ys = inputs(xg, x_len), inputs(yg, y_len)
        out = sdtw(xs, ys) - 0.5 * (sdtw(xs, xs) + sdtw(ys, ys))
        torch.autograd.grad(out.sum(), (xg, yg))

    return _measure(forward, backward_once, divergence, args, device)


def time_tslearn(x, y, x_len, y_len, args, device) -> dict[str, float]:
    """tslearn's per-pair loss on ``--tslearn-pairs`` pairs (each at its own length), scaled to B."""
    from tslearn.metrics import SoftDTWLossPyTorch

    pairs = min(args.tslearn_pairs, args.batch)
    term = SoftDTWLossPyTorch(gamma=args.gamma, normalize=False)
    div_loss = SoftDTWLossPyTorch(gamma=args.gamma, normalize=True)
    views = []
    for b in range(pairs):
        n = x.shape[1] if x_len is None else int(x_len[b])
        m = y.shape[1] if y_len is None else int(y_len[b])
        a = x[b:b + 1, :n].cpu().double().requires_grad_()
        views.append((a, y[b:b + 1, :m].cpu().double().requires_grad_()))

    def forward():
        return [term(a, b) for a, b in views]

    def backward_once():
        outs = forward()
        return lambda: [torch.autograd.grad(out.sum(), view, retain_graph=True)
                        for out, view in zip(outs, views, strict=True)]

    def divergence():
        for a, b in views:
            torch.autograd.grad(div_loss(a, b).sum(), (a, b))

    cpu = torch.device("cpu")
    result = _measure(forward, backward_once, divergence, argparse.Namespace(repeats=1), cpu)
    scale = args.batch / pairs
    return {k: v * scale if k != "mem" else v for k, v in result.items()}


def available_peers(names: list[str]) -> list[str]:
    found = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            print(f"# peer {name} not installed: skipped (pip install -e '.[bench]')")
            continue
        found.append(name)
    return found


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.ratios = [50], 1, [1.25]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    exact_cpu_rss()
    backends = args.backends or (["triton", "cpu"] if device.type == "cuda" else ["cpu"])
    peers = available_peers(args.peers)
    print(f"# device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
          f"cpu threads={torch.get_num_threads()}), B={args.batch}, D={args.dim}, gamma={args.gamma}, "
          f"repeats={args.repeats}; ms are medians; div = divergence forward+backward (3 terms)")
    if "tslearn" in peers:
        print(f"# tslearn: timed on {args.tslearn_pairs} pair(s), scaled to B={args.batch}; "
              f"skipped for N > {args.tslearn_max_n}")
    print(f"| {'N x M':<16} | {'method':<16} | {'fwd ms':>9} | {'bwd ms':>9} | {'div ms':>9} "
          f"| {'peak MiB':>8} | {'div vs ours':>11} |")
    print(f"|{'-' * 18}|{'-' * 18}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 13}|")
    shapes = [(n, max(1, round(n * r)), False) for n in args.sizes for r in args.ratios]
    if not args.no_mixed:
        shapes.append((max(args.sizes), round(max(args.sizes) * args.ratios[0]), True))
    for n, m, mixed in shapes:
        x, y, x_len, y_len = make_batch(args, n, m, mixed, device)
        rows = {f"ours:{b}": time_ours(b, x, y, x_len, y_len, args, device) for b in backends}
        best = min(r["div"] for r in rows.values())
        label = f"{n}x{m}" + (" mixed" if mixed else "")
        for peer in peers:
            if peer == "tslearn" and n > args.tslearn_max_n:
                continue
            timer = time_pysdtw if peer == "pysdtw" else time_tslearn
            try:
                rows[peer] = timer(x, y, x_len, y_len, args, device)
            except Exception as err:  # a peer's own limit (e.g. pysdtw's CUDA 1024-frame cap) is a result
                print(f"| {label:<16} | {peer:<16} | failed: {type(err).__name__}: {str(err)[:60]}")
        for name, r in rows.items():
            print(f"| {label:<16} | {name:<16} | {r['fwd']:9.1f} | {r['bwd']:9.1f} | {r['div']:9.1f} | "
                  f"{r['mem']:8.1f} | {r['div'] / best:10.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
