"""Bench cpc_loss: Triton (CUDA) vs the PyTorch reference, eager and under torch.compile.

python bench/bench_cpc_loss.py --scale {cpu,paper} [--csv PATH] [--md PATH] [--no-compile]
paper: d=256, B=512 users, l=5 positives; shared negatives N in {1024, 4096}; per-user j=128.
"""

from __future__ import annotations

import functools

try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__)

import torch  # noqa: E402

from transrec.bench.kernel_bench_common import Bench, Case, element_size, parse_args
from transrec.kernels.ops import cpc_loss


def make(B: int, L: int, J: int, d: int, shared: bool, dtype: torch.dtype,
         dev: torch.device) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    user = torch.randn(B, d, generator=g) / d**0.5
    pos = torch.randn(B, L, d, generator=g) / d**0.5
    neg = torch.randn(*((J, d) if shared else (B, J, d)), generator=g) / d**0.5
    pm = torch.rand(B, L, generator=g) > 0.1
    nm = torch.rand(B, J, generator=g) > 0.01
    ins = [t.to(device=dev, dtype=dtype).requires_grad_() for t in (user, pos, neg)]
    return ins, {"pos_mask": pm.to(dev), "neg_mask": nm.to(dev)}


def case(B: int, L: int, J: int, d: int, shared: bool, dtype: torch.dtype, dev: torch.device) -> Case:
    es = element_size(dtype)
    n_rows = B * (1 + L) + (J if shared else B * J)  # user, pos and neg vectors
    mask_bytes = B * L + B * J
    def run(impl: str):
        return lambda u, p, n, pos_mask, neg_mask: cpc_loss(u, p, n, pos_mask=pos_mask, neg_mask=neg_mask, impl=impl)
    return Case(
        op="cpc_loss", shape=f"B={B} l={L} {'N' if shared else 'j'}={J} d={d} {'shared' if shared else 'per-user'}",
        dtype=dtype, make=functools.partial(make, B, L, J, d, shared, dtype, dev),
        impls={"triton": run("triton"), "torch": run("torch")},
        # forward reads every vector once; backward reads them again and writes their gradients
        bytes_fwd=n_rows * d * es + mask_bytes,
        bytes_bwd=2 * n_rows * d * es + mask_bytes,
        flops_fwd=2 * B * d * (L + J),
        flops_bwd=4 * B * d * (L + J),
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    bench = Bench(args, "cpc_loss")
    if args.scale == "paper":
        shapes = [
            (512, 5, 4096, 256, True, torch.bfloat16), (512, 5, 1024, 256, True, torch.bfloat16),
            (512, 5, 4096, 256, True, torch.float32), (512, 5, 128, 256, False, torch.bfloat16),
        ]
    else:
        shapes = [(128, 5, 512, 64, True, torch.float32), (128, 5, 32, 64, False, torch.float32)]
    bench.run([case(*s, dev=bench.dev) for s in shapes])
    bench.finish()


if __name__ == "__main__":
    main()
