"""One-command GPU check: soft-DTW kernels against the reference at scale, soft-DTW timings beside pysdtw,
fine-tune throughput and peak memory per preset. Prints three tables and writes them as one JSON file.

1. correctness: the Triton kernels, compiled, against the float64 reference (values and both gradients,
   relative error ||a - b|| / ||b||):
   - the divergence of a 1750 x 2188 mixed-length batch through the public API, in float64 (the kernel's
     arithmetic must match the reference's to rounding) and in float32 (what training uses); its packed
     diagonals are longer than one 1024-cell tile;
   - the kernels launched directly with a small tile (``max_block``) on mixed lengths and a band, so that
     every diagonal spans many tiles;
2. soft-DTW timings (``benchmarks/softdtw.py``'s timers): ours (Triton) and pysdtw's CUDA path, one term
   forward, its backward, and the divergence forward + backward; pysdtw's own limits (its CUDA kernel
   stops at 1024 frames) show as "failed", and a missing pysdtw says so (``pip install -e '.[bench]'``);
3. the probe (``benchmarks/probe.py``'s ``time_probe``): ``python -m s3prl_laser.probe`` end to end on a
   tuned model and its base (random-init base-size HuBERTs) at the default 1 h + 20 min of audio, every
   head running its 2000 steps; the goal is at most 5 minutes on one H100;
4. fine-tuning (``benchmarks/finetune_throughput.py``'s timed steps): base-size random-init HuBERT and
   WavLM with each preset as configured (bf16 autocast on CUDA), pairs/s, the projected hours of the
   paper's recipe (3600 steps x 8 pairs) and the peak memory of the run.

Sections stop being started once ``--budget-s`` seconds have passed (default 8 minutes); what was not run
is reported as such. ``--only probe`` (or any comma-separated list of correctness, softdtw, probe,
finetune) runs those sections alone. Exit code 1 when a correctness check fails.

    make gpu-check                                                       # on a GPU machine
    python benchmarks/gpu_check.py --out runs/gpu_check.json
    python benchmarks/gpu_check.py --only probe --out runs/gpu_check_probe.json      # the probe alone
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json   # CPU, CI
``--smoke`` runs every section at tiny sizes on the CPU (tiny models, 2 steps): the Triton kernels through
the interpreter when ``TRITON_INTERPRET=1``, otherwise the CPU kernel stands in for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import finetune_throughput
import peak_memory
import probe as probe_bench
import softdtw as softdtw_bench
import torch
from measure import exact_cpu_rss

from s3prl_laser.console import setup_console
from s3prl_laser.softdtw import reference, soft_dtw_divergence

GAMMA = 0.1
# The families with the paper's presets; the benchmarks build random-init base models of these two only.
UPSTREAMS = ("hubert", "wavlm")
# relative error allowed: float64 kernels match the float64 reference to rounding; float32 values to about
# 1e-6 and gradients to about 1 % at 2000 frames (README, "Dtypes")
TOLERANCE = {torch.float64: {"value": 1e-9, "grad": 1e-9}, torch.float32: {"value": 1e-4, "grad": 3e-2}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"), help="the JSON report")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the CI path)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no section after this long")
    parser.add_argument("--steps", type=int, default=20, help="timed fine-tuning steps per upstream")
    parser.add_argument(
        "--only", type=sections, default=SECTIONS, metavar="SECTIONS",
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )  # fmt: skip
    return parser


SECTIONS = ("correctness", "softdtw", "probe", "finetune")
PROBE_GOAL_S = 300  # tuned + base at 1 h + 20 min on one H100


def sections(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SECTIONS)}")
    return chosen


def plan(smoke: bool, steps: int) -> dict:
    """Sizes of every section: the GPU check, or the tiny CPU smoke run."""
    if smoke:
        return {
            "device": torch.device("cpu"),
            "divergence": (2, 9, 12, [9, 5], [12, 7], 8),  # B, N, M, x lengths, y lengths, D
            "tiles": {"max_block": 4, "shapes": [(13, 15), (15, 15)], "pairs": 2},
            "timing_sizes": [(12, 15, False), (12, 15, True)],
            "timing": ["--batch", "2", "--dim", "8", "--repeats", "1"],  # benchmarks/softdtw.py options
            # benchmarks/finetune_throughput.py options: tiny models, a few short steps
            "finetune": ["--tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--max-seconds", "2",
                         "--workers", "0", "--eval-clips", "2", "--device", "cpu"],
            "worst_step": (1, 0.5),  # pairs, seconds per view: a small base-size step
            # benchmarks/probe.py's time_probe: tiny models, 2 s clips, a few head steps
            "probe": {"device": "cpu", "train_hours": 0.01, "dev_minutes": 0.3, "steps": 3, "tiny": True,
                      "clip_seconds": 2.0},
        }
    return {
        "device": torch.device("cuda"),
        "divergence": (4, 1750, 2188, [1750, 1400, 1750, 900], [2188, 2188, 1500, 1100], 256),
        "tiles": {"max_block": 16, "shapes": [(300, 370), (370, 370)], "pairs": 3},
        "timing_sizes": [(250, 312, False), (500, 625, False), (875, 1094, False), (1750, 2188, False),
                         (1750, 2188, True)],
        "timing": ["--batch", "8", "--dim", "256", "--repeats", "5"],
        "finetune": ["--steps", str(steps), "--warmup", "3", "--device", "cuda"],  # each preset as configured
        "worst_step": None,  # the largest micro-batch each preset's max_batch_seconds admits
        "probe": {"device": "cuda", "train_hours": 1.0, "dev_minutes": 20.0, "steps": 2000},  # the defaults
    }


def kernel_backend(device: torch.device) -> str:
    """The backend the check runs: Triton on CUDA or under the interpreter, else the CPU kernel."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def verdict(name: str, dtype: torch.dtype, errors: dict[str, float], **facts) -> dict:
    """One correctness row: the errors, their tolerances and whether all are within them."""
    tol = TOLERANCE[dtype]
    ok = all(err < tol["value" if key == "value" else "grad"] for key, err in errors.items())
    return {"check": name, "dtype": str(dtype).replace("torch.", ""), "errors": errors, "tolerance": tol,
            "passed": ok, **facts}


def check_divergence(device: torch.device, backend: str, sizes: tuple, dtype: torch.dtype) -> dict:
    """Divergence values and gradients of ``backend`` against the float64 reference, mixed lengths."""
    B, N, M, x_len, y_len, D = sizes
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(B, M, D, generator=g, dtype=torch.float64), dim=-1)
    upstream = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    outs = {}
    for name, t in ((backend, dtype), ("reference", torch.float64)):
        a, b = x.to(device, t).requires_grad_(), y.to(device, t).requires_grad_()
        value = soft_dtw_divergence(a, b, GAMMA, x_len, y_len, backend=name)
        grads = torch.autograd.grad(value, (a, b), upstream.to(device, value.dtype))
        outs[name] = (value, *grads)
    errors = {what: rel_err(got, want)
              for what, got, want in zip(("value", "grad x", "grad y"), outs[backend], outs["reference"],
                                         strict=True)}
    facts = {"size": f"{B} x {N} x {M}", "backend": backend}
    if backend == "triton":
        from s3prl_laser.softdtw import triton_backend

        longest = max(N, M)  # the three terms share one [3B, longest, longest] launch; y against y is longest
        tile = triton_backend.launch_config(longest, longest)["BLOCK"]
        facts["tiles per longest diagonal"] = -(-longest // tile)
    return verdict(f"divergence {N}x{M} mixed lengths", dtype, errors, **facts)


def check_small_tiles(device: torch.device, spec: dict, dtype: torch.dtype) -> dict:
    """The Triton kernels with tiles of ``max_block`` cells against the reference (mixed lengths, a band)."""
    from s3prl_laser.softdtw import triton_backend
    from s3prl_laser.softdtw._common import band_widths

    g = torch.Generator().manual_seed(1)
    costs = [3 * torch.rand(spec["pairs"], *shape, generator=g, dtype=torch.float64)
             for shape in spec["shapes"]]
    n, m = [], []
    for shape in spec["shapes"]:  # shorter pairs, then the full size: the very last pair ends the table
        for k in reversed(range(spec["pairs"])):
            n.append(max(1, shape[0] - k * shape[0] // (spec["pairs"] + 1)))
            m.append(max(1, shape[1] - k * shape[1] // (spec["pairs"] + 2)))
    W = band_widths(n, m, None)
    W[1] = band_widths(n[1:2], m[1:2], 2.0)[0]
    upstream = torch.rand(len(n), generator=g, dtype=torch.float64) + 0.5
    got_costs = [c.to(device, dtype) for c in costs]
    values, saved = triton_backend.forward(got_costs, n, m, W, GAMMA, max_block=spec["max_block"])
    grads = triton_backend.backward(got_costs, saved, n, m, W, GAMMA, upstream.to(device, dtype),
                                    max_block=spec["max_block"])
    want_costs = [c.to(device) for c in costs]
    want_values, want_saved = reference.forward(want_costs, n, m, W, GAMMA)
    want_grads = reference.backward(want_costs, want_saved, n, m, W, GAMMA, upstream.to(device))
    errors = {"value": rel_err(values, want_values),
              "grad cost": rel_err(torch.cat([t.flatten() for t in grads]),
                                   torch.cat([t.flatten() for t in want_grads]))}
    longest = max(min(a, b) for a, b in zip(n, m, strict=True))
    return verdict(f"kernels, tiles of {spec['max_block']}", dtype, errors, size=f"{len(n)} pairs up to "
                   f"{max(s[0] for s in spec['shapes'])}x{max(s[1] for s in spec['shapes'])}",
                   backend="triton", **{"tiles per longest diagonal": -(-longest // spec["max_block"])})


def correctness(p: dict) -> list[dict]:
    device, backend = p["device"], kernel_backend(p["device"])
    dtypes = (torch.float64, torch.float32)
    rows = [check_divergence(device, backend, p["divergence"], dtype) for dtype in dtypes]
    if backend == "triton":
        rows += [check_small_tiles(device, p["tiles"], dtype) for dtype in dtypes]
    else:
        rows.append({"check": "kernels, small tiles", "passed": None,
                     "note": "not run: needs CUDA or TRITON_INTERPRET=1"})
    return rows


def softdtw_timings(p: dict) -> list[dict]:
    """Ours and pysdtw side by side (``benchmarks/softdtw.py``'s timers); each row one method at one size."""
    device = p["device"]
    args = softdtw_bench.get_args_parser().parse_args([*p["timing"], "--gamma", str(GAMMA)])
    backend = "triton" if device.type == "cuda" else "cpu"
    try:
        import pysdtw  # noqa: F401
    except ImportError:
        pysdtw_missing = "pysdtw not installed (pip install -e '.[bench]')"
    else:
        pysdtw_missing = None
    rows = []
    for n, m, mixed in p["timing_sizes"]:
        label = f"{n}x{m}" + (" mixed" if mixed else "")
        x, y, x_len, y_len = softdtw_bench.make_batch(args, n, m, mixed, device)
        rows.append({"size": label, "method": f"ours ({backend})",
                     **softdtw_bench.time_ours(backend, x, y, x_len, y_len, args, device)})
        pysdtw_path = "pysdtw (CUDA)" if device.type == "cuda" else "pysdtw (CPU)"
        if pysdtw_missing:
            rows.append({"size": label, "method": pysdtw_path, "note": pysdtw_missing})
            continue
        try:
            rows.append({"size": label, "method": pysdtw_path,
                         **softdtw_bench.time_pysdtw(x, y, x_len, y_len, args, device)})
        except Exception as err:  # a peer's own limit (its CUDA kernel's 1024-frame cap) is a result
            rows.append({"size": label, "method": pysdtw_path,
                         "note": f"failed: {type(err).__name__}: {str(err)[:80]}"})
    return rows


def finetune(p: dict, upstream: str, workdir: Path) -> dict:
    """Throughput and peak memory of one preset (``benchmarks/finetune_throughput.py``'s ``run_one``)."""
    args = finetune_throughput.get_args_parser().parse_args(p["finetune"])
    r = finetune_throughput.run_one(upstream, args, workdir)
    return {"preset": f"{upstream}_laser", "model": "tiny" if args.tiny else "base (random init)",
            "precision": r["precision"], "batch_size": r["batch_size"], "pairs per step": r["pairs_per_step"],
            "pairs/s": r["pairs_per_s"], "step s": r["step"], "softdtw s": r["softdtw"],
            "peak MiB": r["peak_mib"], "3600x8 h": finetune_throughput.projected_hours(r["pairs_per_s"]),
            "val s": r["validation"], "val % of eval_every steps": 100 * r["validation_share"]}


def worst_step_memory(p: dict, upstream: str) -> dict:
    """Peak memory of one base-size training step on the largest micro-batch the preset's budget admits, in a
    fresh process (``benchmarks/peak_memory.py``); a step that ran out of memory is reported as skipped."""
    shape = p["worst_step"] or peak_memory.worst_step(upstream)
    if shape is None:
        return {"worst step": "no max_batch_seconds budget"}
    pairs, seconds = shape
    cmd = [sys.executable, peak_memory.__file__, "--upstream", upstream, "--device", str(p["device"]),
           "--one", f"{pairs}x{seconds:.3f}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"worst step": f"{pairs} x {seconds:.1f} s: failed (exit {done.returncode}): {last[:80]}"}
    point = json.loads(done.stdout.strip().splitlines()[-1])
    shape_text = f"{pairs} x {seconds:.1f} s" + (" (smoke)" if p["worst_step"] else "")
    shape_text += "" if point["stepped"] else " (step skipped)"  # out of memory, or a non-finite loss
    return {"worst step": shape_text, "worst step peak MiB": point["peak"] / 2**20}


def print_tables(report: dict) -> None:
    print(f"# {report['device']}, torch {report['torch']}, triton {report['triton']}")
    ran = report["sections"]
    if "correctness" in ran:
        print_correctness(report)
    if report["probe"]:
        print_probe(report["probe"])
    if "softdtw" in ran:
        print_softdtw(report)
    if "finetune" in ran:
        print_finetune(report)
    print(f"\n{report['elapsed_s']:.0f} s; report: {report['out']}")


def print_correctness(report: dict) -> None:
    print("\n## correctness (relative error against the float64 reference)")
    print(f"| {'check':<34} | {'dtype':<7} | {'size':<26} | {'tiles':>5} | {'errors':<44} | {'ok':<4} |")
    print(f"|{'-' * 36}|{'-' * 9}|{'-' * 28}|{'-' * 7}|{'-' * 46}|{'-' * 6}|")
    for r in report["correctness"]:
        if r.get("passed") is None:
            print(f"| {r['check']:<34} | {'':<7} | {'':<26} | {'':>5} | {r.get('note', ''):<44} | {'-':<4} |")
            continue
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        tiles = r.get("tiles per longest diagonal", "")
        print(f"| {r['check']:<34} | {r['dtype']:<7} | {r['size']:<26} | {tiles!s:>5} | {errors:<44} "
              f"| {'yes' if r['passed'] else 'NO':<4} |")


def print_probe(probe: dict) -> None:
    print("\n## the probe: python -m s3prl_laser.probe, tuned + base, every head its whole step budget")
    if "failed" in probe:
        print(f"FAILED after {probe['seconds']:.0f} s: {probe['failed']}")
        return
    goal = f", goal {probe['goal s']} s" if "goal s" in probe else " (smoke: tiny models)"
    print(f"{probe['train hours']:g} h + {probe['dev minutes']:g} min, {probe['steps']} steps, "
          f"{probe['device']}: {probe['seconds']:.0f} s{goal}; head steps run {probe['head steps run']}, "
          f"CER % {probe['CER %']} (noise audio, random transcripts)")


def print_softdtw(report: dict) -> None:
    print("\n## soft-DTW, ms (medians); div = divergence forward + backward (3 terms)")
    print(f"| {'N x M':<16} | {'method':<16} | {'fwd ms':>8} | {'bwd ms':>8} | {'div ms':>8} "
          f"| {'peak MiB':>8} |")
    print(f"|{'-' * 18}|{'-' * 18}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for r in report["softdtw"]:
        if "note" in r:
            print(f"| {r['size']:<16} | {r['method']:<16} | {r['note']}")
            continue
        print(f"| {r['size']:<16} | {r['method']:<16} | {r['fwd']:8.2f} | {r['bwd']:8.2f} | {r['div']:8.2f} "
              f"| {r['mem']:8.1f} |")


def print_finetune(report: dict) -> None:
    print("\n## fine-tuning, one process; 3600x8 h: projected hours of the paper's recipe at this speed")
    print("pairs: mean pairs per step; peak: over the timed run; worst step: pairs x seconds per view of the")
    print("largest micro-batch the preset's max_batch_seconds admits, one base-size step in a fresh process")
    print(f"| {'preset':<13} | {'model':<18} | {'precision':<9} | {'pairs':>5} | {'pairs/s':>8} "
          f"| {'step s':>7} | {'peak MiB':>9} | {'3600x8 h':>8} | {'worst step':<18} "
          f"| {'its peak MiB':>12} |")
    print(f"|{'-' * 15}|{'-' * 20}|{'-' * 11}|{'-' * 7}|{'-' * 10}|{'-' * 9}|{'-' * 11}|{'-' * 10}|{'-' * 20}"
          f"|{'-' * 14}|")
    for r in report["finetune"]:
        if "note" in r:
            print(f"| {r['preset']:<13} | {r['note']}")
            continue
        worst_peak = r.get("worst step peak MiB")
        worst_peak = "-" if worst_peak is None else f"{worst_peak:.0f}"
        print(f"| {r['preset']:<13} | {r['model']:<18} | {r['precision']:<9} | {r['pairs per step']:5.1f} "
              f"| {r['pairs/s']:8.2f} | {r['step s']:7.3f} | {r['peak MiB']:9.0f} | {r['3600x8 h']:8.2f} "
              f"| {r.get('worst step', 'not run'):<18} | {worst_peak:>12} |")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # the tables are the screen: our warnings stay on it, other libraries' chatter goes to DEBUG
    setup_console(logging.WARNING, "%(levelname)s %(name)s: %(message)s")
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or --smoke for the CPU path")
        return 2
    p = plan(args.smoke, args.steps)
    device = p["device"]
    exact_cpu_rss()
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    report = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
              "out": str(args.out), "sections": list(args.only), "correctness": [], "softdtw": [],
              "probe": {}, "finetune": []}
    start = time.perf_counter()

    def in_budget(what: str) -> bool:
        if time.perf_counter() - start < args.budget_s:
            return True
        print(f"# {what}: not run (time budget of {args.budget_s:.0f} s spent)")
        return False

    if "correctness" in args.only:
        print("# correctness ...", flush=True)
        report["correctness"] = correctness(p)
    if "softdtw" in args.only and in_budget("soft-DTW timings"):
        print("# soft-DTW timings ...", flush=True)
        report["softdtw"] = softdtw_timings(p)
    if "probe" in args.only and in_budget("the probe"):
        print("# the probe, tuned + base ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            report["probe"] = probe_bench.time_probe(Path(tmp), **p["probe"])
        if not args.smoke:
            report["probe"]["goal s"] = PROBE_GOAL_S
    with tempfile.TemporaryDirectory() as tmp:
        for upstream in UPSTREAMS if "finetune" in args.only else ():
            if not in_budget(f"fine-tuning {upstream}"):
                report["finetune"].append({"preset": f"{upstream}_laser", "note": "not run (time budget)"})
                continue
            print(f"# fine-tuning {upstream} ...", flush=True)
            row = finetune(p, upstream, Path(tmp))
            if in_budget(f"worst-step memory of {upstream}"):
                row.update(worst_step_memory(p, upstream))
            report["finetune"].append(row)
    report["elapsed_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_tables(report)
    failed = [r["check"] for r in report["correctness"] if r.get("passed") is False]
    if "failed" in report["probe"]:
        failed.append("the probe")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
