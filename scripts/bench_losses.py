"""Benchmark gkl_loss (closed form) against the B x C x C form and Hinton KD.

Measures forward+backward wall time (median over repeats) and peak memory for B in {64, 128, 256}
and C in {10, 100, 1000}, all three measured in the same run, and prints ratios.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the allocator's live bytes
replayed from ``torch.profiler`` memory events (allocations minus frees, in time order).

    python scripts/bench_losses.py                 # full table
    python scripts/bench_losses.py --quick         # B=128, C=1000 only
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gkl.losses import gkl_loss, kd_loss

GKL_KWARGS = dict(alpha=1.0, beta=8.0, gamma=1.0, temperature=4.0)


def gkl_pairwise(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The authors' reference form: B x C x C pairwise logit differences and weights."""
    c = t.shape[1]
    delta_t = t.view(-1, c, 1) - t.view(-1, 1, c)
    delta_s = s.view(-1, c, 1) - s.view(-1, 1, c)
    with torch.no_grad():
        w = F.softmax(t, dim=1).pow(GKL_KWARGS["gamma"])
        pair_w = w.view(-1, c, 1) @ w.view(-1, 1, c)
    wmse = 0.25 * ((delta_t - delta_s).pow(2) * pair_w).sum() / pair_w.sum()
    temperature = GKL_KWARGS["temperature"]
    soft = F.softmax(t / temperature, dim=1).detach()
    sce = -(soft * F.log_softmax(s / temperature, dim=1)).sum(1).mean()
    return GKL_KWARGS["beta"] * wmse + GKL_KWARGS["alpha"] * sce


METHODS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gkl": lambda s, t: gkl_loss(s, t, **GKL_KWARGS),
    "gkl_bcc": gkl_pairwise,
    "kd": lambda s, t: kd_loss(s, t, temperature=4.0),
}


def forward_backward(fn, s: torch.Tensor, t: torch.Tensor) -> None:
    s.grad = t.grad = None
    fn(s, t).backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fns: dict[str, Callable], s: torch.Tensor, t: torch.Tensor, *, repeats: int, budget_s: float
) -> dict[str, float]:
    """Median fwd+bwd time of each function, measured interleaved so noise hits all alike."""
    for fn in fns.values():
        forward_backward(fn, s, t)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for round_index in range(repeats):
        if round_index >= 3 and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            sync(s.device)
            t0 = time.perf_counter()
            forward_backward(fn, s, t)
            sync(s.device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes(fn, s, t) -> int:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
        base = torch.cuda.memory_allocated(s.device)
        forward_backward(fn, s, t)
        torch.cuda.synchronize(s.device)
        return torch.cuda.max_memory_allocated(s.device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(fn, s, t)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def run(batches, classes_list, device, repeats, budget_s):
    rows = []
    for batch in batches:
        for classes in classes_list:
            g = torch.Generator().manual_seed(0)
            s = (3 * torch.randn(batch, classes, generator=g)).to(device).requires_grad_()
            t = (3 * torch.randn(batch, classes, generator=g)).to(device).requires_grad_()
            # The fast pair (gkl vs KD) interleaved; the slow B x C x C form on its own.
            fast = {name: METHODS[name] for name in ("gkl", "kd")}
            secs = median_seconds(fast, s, t, repeats=repeats, budget_s=budget_s)
            secs |= median_seconds(
                {"gkl_bcc": METHODS["gkl_bcc"]}, s, t, repeats=repeats, budget_s=budget_s
            )
            mem = {name: peak_bytes(fn, s, t) for name, fn in METHODS.items()}
            rows.append((batch, classes, secs, mem))
            print_row(*rows[-1])
    return rows


def print_header(device, threads):
    print(f"device={device} torch={torch.__version__} threads={threads}; fwd+bwd median times")
    print(
        "|   B |    C | gkl (ms) | B x C x C (ms) | KD (ms) | speed-up vs BxCxC | gkl / KD time "
        "| gkl peak MB | BxCxC peak MB | KD peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")


def print_row(batch, classes, secs, mem):
    mb = {k: v / 2**20 for k, v in mem.items()}
    print(
        f"| {batch:3d} | {classes:4d} | {secs['gkl'] * 1e3:8.3f} | {secs['gkl_bcc'] * 1e3:14.3f} "
        f"| {secs['kd'] * 1e3:7.3f} | {secs['gkl_bcc'] / secs['gkl']:17.1f}x "
        f"| {secs['gkl'] / secs['kd']:12.2f}x | {mb['gkl']:11.2f} | {mb['gkl_bcc']:13.1f} "
        f"| {mb['kd']:10.2f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only B=128, C=1000")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=3.0, help="time budget per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, classes = ([128], [1000]) if args.quick else ([64, 128, 256], [10, 100, 1000])
    device = torch.device(args.device)
    print_header(device, args.threads)
    run(batches, classes, device, args.repeats, args.budget_s)


if __name__ == "__main__":
    main()
