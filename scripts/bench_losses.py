"""Benchmark gkl_loss against Hinton KD (and the B x C x C form), teacher frozen and not.

Forward+backward time (median over interleaved repeats) for two cases, each as a ratio against
``kd_loss`` measured in the same rounds:

- ``frozen``: the teacher logits need no gradient (distillation from a frozen teacher; gkl_loss
  takes its fused single-input path);
- ``both``: both inputs need gradients (adversarial training: both branches are the network).

Also the authors' B x C x C form (both inputs with gradients) and peak memory. Peak memory:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the allocator's live bytes replayed from
``torch.profiler`` memory events (allocations minus frees, in time order).

``--clock cpu`` times with ``time.process_time`` (the process's CPU time over all its threads),
which a busy shared machine distorts less than wall time; CUDA always uses wall time.

    python scripts/bench_losses.py                 # B in {64, 128, 256} x C in {10, 100, 1000}
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
CASES = ("frozen", "both")


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
    "kd": lambda s, t: kd_loss(s, t, temperature=GKL_KWARGS["temperature"]),
    "gkl_bcc": gkl_pairwise,
}


def forward_backward(fn, s: torch.Tensor, t: torch.Tensor) -> None:
    s.grad = t.grad = None
    fn(s, t).backward()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    runs: dict[str, tuple[Callable, torch.Tensor, torch.Tensor]],
    *,
    repeats: int,
    budget_s: float,
    clock: Callable[[], float],
) -> dict[str, float]:
    """Median fwd+bwd time of each ``(fn, s, t)``, measured interleaved so noise hits all alike."""
    for fn, s, t in runs.values():
        forward_backward(fn, s, t)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    for round_index in range(repeats):
        if round_index >= 5 and time.perf_counter() - start > budget_s:
            break
        for name, (fn, s, t) in runs.items():
            sync(s.device)
            t0 = clock()
            forward_backward(fn, s, t)
            sync(s.device)
            times[name].append(clock() - t0)
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


def inputs(batch: int, classes: int, device: torch.device):
    """Student logits with gradients, and the teacher logits frozen and with gradients."""
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(batch, classes, generator=g)).to(device).requires_grad_()
    t = (3 * torch.randn(batch, classes, generator=g)).to(device)
    return s, {"frozen": t, "both": t.clone().requires_grad_()}


def run(batches, classes_list, device, repeats, budget_s, clock, with_bcc):
    rows = []
    for batch in batches:
        for classes in classes_list:
            s, teachers = inputs(batch, classes, device)
            # gkl and KD in both cases, interleaved in the same rounds.
            fast = {
                f"{name}_{case}": (METHODS[name], s, teachers[case])
                for case in CASES
                for name in ("gkl", "kd")
            }
            secs = median_seconds(fast, repeats=repeats, budget_s=budget_s, clock=clock)
            mem = {key: peak_bytes(*run_args) for key, run_args in fast.items()}
            if with_bcc:  # the slow B x C x C form on its own
                bcc = {"gkl_bcc": (METHODS["gkl_bcc"], s, teachers["both"])}
                secs |= median_seconds(bcc, repeats=repeats, budget_s=budget_s, clock=clock)
                mem["gkl_bcc"] = peak_bytes(*bcc["gkl_bcc"])
            rows.append((batch, classes, secs, mem))
            print_row(*rows[-1])
    return rows


def print_header(device, threads, clock_name, with_bcc):
    print(
        f"device={device} torch={torch.__version__} threads={threads} clock={clock_name}; "
        f"fwd+bwd median times; frozen: teacher without gradient, both: gradients into both"
    )
    columns = [
        "B",
        "C",
        "KD frozen (ms)",
        "gkl frozen (ms)",
        "gkl / KD frozen",
        "KD both (ms)",
        "gkl both (ms)",
        "gkl / KD both",
        "gkl frozen peak MB",
        "gkl both peak MB",
        "KD both peak MB",
    ]
    if with_bcc:
        columns += ["B x C x C (ms)", "B x C x C / gkl both", "B x C x C peak MB"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def print_row(batch, classes, secs, mem):
    ms = {k: v * 1e3 for k, v in secs.items()}
    mb = {k: v / 2**20 for k, v in mem.items()}
    cells = [
        f"{batch}",
        f"{classes}",
        f"{ms['kd_frozen']:.3f}",
        f"{ms['gkl_frozen']:.3f}",
        f"{ms['gkl_frozen'] / ms['kd_frozen']:.2f}x",
        f"{ms['kd_both']:.3f}",
        f"{ms['gkl_both']:.3f}",
        f"{ms['gkl_both'] / ms['kd_both']:.2f}x",
        f"{mb['gkl_frozen']:.2f}",
        f"{mb['gkl_both']:.2f}",
        f"{mb['kd_both']:.2f}",
    ]
    if "gkl_bcc" in ms:
        cells += [
            f"{ms['gkl_bcc']:.3f}",
            f"{ms['gkl_bcc'] / ms['gkl_both']:.1f}x",
            f"{mb['gkl_bcc']:.1f}",
        ]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only B=128, C=1000")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=3.0, help="time budget per measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--no-bcc", action="store_true", help="skip the B x C x C reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, classes = ([128], [1000]) if args.quick else ([64, 128, 256], [10, 100, 1000])
    device = torch.device(args.device)
    clock_name = "wall" if device.type == "cuda" else args.clock
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    print_header(device, args.threads, clock_name, not args.no_bcc)
    run(batches, classes, device, args.repeats, args.budget_s, clock, not args.no_bcc)


if __name__ == "__main__":
    main()
