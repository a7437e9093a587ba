"""Bench attention_pool: Triton (CUDA) vs the PyTorch reference, eager and under torch.compile.

python bench/bench_attention_pool.py --scale {cpu,paper} [--csv PATH] [--md PATH] [--no-compile]
paper: B=512 users x T=32 tokens x H=768 hidden (A=256 attention units), fp32 and bf16.
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
from transrec.kernels.ops import attention_pool

ATTN_DIM = 256


def make(B: int, T: int, H: int, A: int, dtype: torch.dtype, dev: torch.device) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, H, generator=g)
    w1 = torch.randn(H, A, generator=g) / H**0.5
    b1 = torch.zeros(A)
    w2 = torch.randn(A, generator=g) / A**0.5
    b2 = torch.zeros(())
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dev)
    ins = [t.to(device=dev, dtype=dtype).requires_grad_() for t in (x, w1, b1, w2, b2)]
    return ins, {"mask": mask}


def case(B: int, T: int, H: int, A: int, dtype: torch.dtype, dev: torch.device) -> Case:
    es = element_size(dtype)
    x_bytes, w_bytes = B * T * H * es, H * A * es
    def run(impl: str):
        return lambda x, w1, b1, w2, b2, mask: attention_pool(x, mask, w1, b1, w2, b2, impl=impl)
    return Case(
        op="attention_pool", shape=f"B={B} T={T} H={H} A={A}", dtype=dtype,
        make=functools.partial(make, B, T, H, A, dtype, dev),
        impls={"triton": run("triton"), "torch": run("torch")},
        # forward reads x, mask, w1 and writes out; backward reads x, dout, w1 and writes dx, dw1
        bytes_fwd=x_bytes + B * T + w_bytes + B * H * es,
        bytes_bwd=2 * x_bytes + B * H * es + 2 * w_bytes,
        flops_fwd=2 * B * T * H * A + 2 * B * T * H,
        flops_bwd=6 * B * T * H * A,
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    bench = Bench(args, "attention_pool")
    dev = bench.dev
    if args.scale == "paper":
        shapes = [(512, 32, 768, ATTN_DIM, torch.bfloat16), (512, 32, 768, ATTN_DIM, torch.float32)]
    else:
        shapes = [(64, 32, 256, 64, torch.float32), (64, 32, 256, 64, torch.bfloat16)]
    bench.run([case(B, T, H, A, dt, dev) for B, T, H, A, dt in shapes])
    bench.finish()


if __name__ == "__main__":
    main()
