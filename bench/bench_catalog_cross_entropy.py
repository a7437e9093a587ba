"""Bench catalog_cross_entropy: Triton (CUDA) vs the PyTorch reference, eager and under torch.compile.

python bench/bench_catalog_cross_entropy.py --scale {cpu,paper} [--csv PATH] [--md PATH] [--no-compile]
paper: M=4096 hidden states (and 12800 = 512 users x 25 steps), d=256, V up to 1M items, bf16 (+ fp32).
"torch" is the dispatcher's reference (plain spec for M*V <= 2^24 logits, V-chunked above);
"torch_spec" is the plain spec, which materialises [M, V] logits (run only while it fits in memory);
"torch_compile" compiles the plain spec. Rows with E > 0 pass an exclusion list [M, E] (the content softmax's
history mask: E = the window length) over a sampled-candidate catalogue (V = a batch's candidates).
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
from transrec.kernels.ops import catalog_cross_entropy
from transrec.kernels.pytorch.pt_catalog_cross_entropy import pt_catalog_cross_entropy


def make(M: int, V: int, d: int, dtype: torch.dtype, dev: torch.device, E: int = 0) -> tuple[list[torch.Tensor], dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(M, d, generator=g)
    w = torch.randn(V, d, generator=g) / d**0.5
    b = torch.zeros(V)
    target = torch.randint(0, V, (M,), generator=g)
    target[::10] = -100
    ins = [t.to(device=dev, dtype=dtype).requires_grad_() for t in (h, w, b)]
    extra = {"target": target.to(dev)}
    if E:
        extra["exclude"] = torch.randint(-1, V, (M, E), generator=g).to(dev)
    return ins, extra


def case(M: int, V: int, d: int, dtype: torch.dtype, dev: torch.device, E: int = 0) -> Case:
    es = element_size(dtype)
    def run(impl: str):
        return lambda h, w, b, target, exclude=None: catalog_cross_entropy(h, w, b, target, exclude=exclude, impl=impl)
    def spec(h, w, b, target, exclude=None):
        return pt_catalog_cross_entropy(h, w, b, target, exclude=exclude)
    # the spec keeps ~4 fp32 [M, V] tensors alive around its backward
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 8 << 30
    skip = {} if 0.8 * free > 16 * M * V else {"torch_spec": "skipped: [M, V] logits do not fit"}
    if M * V > 1 << 32:  # thousands of Python-level chunks per call: seconds per sample
        skip["torch"] = "skipped: the chunked reference is too slow at this size for the time budget"
    return Case(
        op="catalog_cross_entropy", shape=f"M={M} V={V} d={d}" + (f" E={E}" if E else ""), dtype=dtype,
        make=functools.partial(make, M, V, d, dtype, dev, E),
        impls={"triton": run("triton"), "torch": run("torch"), "torch_spec": spec},
        # forward reads h, W, bias; backward reads them again and writes their gradients
        bytes_fwd=(M * d + V * d + V) * es + 8 * M * (1 + E),
        bytes_bwd=2 * (M * d + V * d + V) * es + 8 * M * (1 + E),
        flops_fwd=2 * M * V * d,
        flops_bwd=4 * M * V * d,
        skip=skip,
        compile_base="torch_spec",
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    bench = Bench(args, "catalog_cross_entropy")
    bench.extra_impls = ["torch_spec"]
    if args.scale == "paper":
        shapes = [
            (4096, 65536, 256, torch.bfloat16), (4096, 65536, 256, torch.float32),
            (4096, 262144, 256, torch.bfloat16), (12800, 1048576, 256, torch.bfloat16),
            (12800, 16384, 256, torch.bfloat16, 25),  # the content softmax: 512 windows x 25, sampled candidates
        ]
    else:
        shapes = [(512, 8192, 64, torch.float32), (1024, 32768, 64, torch.float32), (512, 8192, 64, torch.float32, 25)]
    bench.run([case(*shape[:4], bench.dev, *shape[4:]) for shape in shapes])
    bench.finish()


if __name__ == "__main__":
    main()
