"""Operator calls of a training step, counted with the torch profiler: a CPU-visible proxy of GPU launch overhead.

    counts = count_ops(lambda: step(batch))      # Counter of aten operator names (top-level calls and nested)
    host_syncs(counts)                           # the calls among them that read a device value back to the host

On a GPU every aten call is at least one kernel launch and every host read-back (`.item()`, `nonzero`, a bool
mask index, `torch.equal`) stalls the launch queue until the device catches up. Both counts are exact and
independent of the machine, so they can regress in CI where no GPU is; `bench/throughput.py --json` writes them as
`ops_per_step` and `host_syncs_per_step`.
"""

from __future__ import annotations

from collections import Counter

# aten operators that copy a device value to the host (or need its size): each one waits for the device.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero",
                 "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive")


def count_ops(fn) -> Counter:
    """Run `fn` once under the profiler; the number of calls of every aten operator (nested calls included)."""
    return _profile(fn)[0]


def host_syncs(counts: Counter) -> dict[str, int]:
    """The host read-backs among `counts` (operator -> calls), zero counts left out."""
    return {op: counts[op] for op in HOST_SYNC_OPS if counts.get(op)}


def step_counts(fn) -> dict:
    """One run of `fn`: every aten call, the calls issued from Python (not nested in another aten op: the
    dispatch work), and the host read-backs."""
    counts, top_level = _profile(fn)
    syncs = host_syncs(counts)
    return {"ops_per_step": sum(counts.values()), "top_level_ops_per_step": top_level,
            "host_syncs_per_step": sum(syncs.values()), "host_syncs": syncs}


def _profile(fn) -> tuple[Counter, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    nested = {id(c) for e in events for c in e.cpu_children}
    return Counter(e.name for e in events), sum(1 for e in events if id(e) not in nested)
