"""Process set-up: distributed back-end, device, rank-0 logging, run directory, DeepSpeed config filling."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from transrec.trainer.core.config import DS_OWNED_BY_TRAINER, RunConfig, StageConfig
from transrec.trainer.core.config_records import to_dict

LOG = logging.getLogger("transrec")
# DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) gives each rank of a one-machine multi-rank run a ~66 MB
# POSIX shared-memory segment named <prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> and never unlinks it: every
# such run would leave its segments in /dev/shm (RAM) until reboot.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer(rank: int, shm_dir: Path = SHM_DIR) -> Path:
    """This rank's all-reduce segment, named as DeepSpeed names it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return shm_dir / f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def stale_shm_buffers(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), min_age_s: float = 60.0) -> list[Path]:
    """This user's all-reduce segments that no live process maps: left by runs that were killed, or that ran before
    the trainer released them. A segment younger than `min_age_s` is left alone (its rank may be starting)."""
    mine = sorted(shm_dir.glob(f"{SHM_PREFIX}_{os.getuid()}_*"))
    if not mine:
        return []
    mapped = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is another user's
            continue
        mapped.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if SHM_PREFIX in line)
    now = time.time()
    return [p for p in mine if str(p) not in mapped and now - modified(p, default=now) > min_age_s]


def modified(path: Path, default: float) -> float:
    """The file's modification time; `default` when it is gone (a segment its own rank unlinked meanwhile)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return default


def release_shm_buffers(rank: int) -> None:
    """Remove stale segments (local rank 0), and unlink this rank's own at exit: every rank maps its peers' segments
    during initialisation, so the names are no longer needed once training starts."""
    if not SHM_DIR.is_dir():
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        stale = stale_shm_buffers()
        size = 0
        for p in stale:
            with contextlib.suppress(FileNotFoundError):  # unlinked meanwhile by its own rank
                size += p.stat().st_size
            p.unlink(missing_ok=True)
        if stale:
            LOG.info("removed %d stale DeepSpeed all-reduce segments (%.0f MiB) from %s, left by earlier multi-rank "
                     "runs", len(stale), size / 2**20, SHM_DIR)
    atexit.register(shm_buffer(rank).unlink, missing_ok=True)


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed when launched with several ranks.

    Without CUDA, DeepSpeed's CPU accelerator with gloo is used and each rank runs one intra-op thread
    (OMP_NUM_THREADS=1), which is what shares a few cores between ranks well."""
    if "RANK" not in os.environ:  # started with plain `python`: a single rank
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(port)),
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if world > 1:
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)
        # DeepSpeed's import probes CUDA and warns "No CUDA runtime is found": expected on a CPU run, not news.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        except dist.DistNetworkError as e:
            if not port_in_use(e):
                raise
            addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
            raise SystemExit(f"error: MASTER_PORT {port} is already in use on {addr}: pass another port (deepspeed "
                             "--master_port N) or stop the process holding it") from None
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def port_in_use(error: BaseException) -> bool:
    """torch.distributed's rendezvous store could not listen on MASTER_PORT because something holds it."""
    text = str(error).lower()
    return "address already in use" in text or "eaddrinuse" in text


def setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[transrec %(asctime)s] %(message)s", "%H:%M:%S"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    LOG.propagate = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_run_dir(cfg: RunConfig) -> Path:
    """The folder of a run given no --run-dir: runs/<date>-<time>-<preset>."""
    return Path("runs") / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.preset}"


def make_run_dir(cfg: RunConfig, rank: int) -> Path:
    """A new folder under runs/ (or --run-dir), the same on every rank (rank 0's). trainer/main.py has already
    locked it (trainer/training/run_lock.py, rank 0) and the other ranks waited for that; rank 0 creates it here for a
    Trainer made without main()."""
    path = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return path


ZERO_STAGES = (0, 1, 2, 3)


def load_ds_config(path: str) -> dict:
    """The DeepSpeed engine config at `path`, checked: FileNotFoundError or ValueError in one line naming the file
    (missing, not JSON, not an object, a ZeRO stage other than 0-3, or a key the trainer fills in)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} not found: pick one of ds_configs/*.json")
    try:
        ds = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"DeepSpeed config {path} cannot be read ({getattr(e, 'strerror', None) or e}): give a JSON "
                         "file such as ds_configs/zero2.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({e}): fix it, or start from "
                         "ds_configs/zero2.json") from None
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object, not {type(ds).__name__}: start from "
                         "ds_configs/zero2.json")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if not isinstance(zero, dict) or isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, not "
                         f"{repr(stage if isinstance(zero, dict) else zero)[:40]} (ds_configs/zero*.json hold one of "
                         "each)")
    owned = [k for k in DS_OWNED_BY_TRAINER if k in ds]
    if owned:
        raise ValueError(
            f"{path} sets {owned}: batch size, optimizer, scheduler and clipping come from the trainer's "
            "config (stage1.micro_batch, stage1.grad_accum, stage1.lr, ...); remove them from the ds_config"
        )
    return ds


def fill_ds_config(base: dict, stage: StageConfig, world: int) -> dict:
    ds = json.loads(json.dumps(base))
    ds["train_micro_batch_size_per_gpu"] = stage.micro_batch
    ds["gradient_accumulation_steps"] = stage.grad_accum
    ds["train_batch_size"] = stage.micro_batch * stage.grad_accum * world
    ds["gradient_clipping"] = stage.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def write_run_record(run_dir: Path, cfg: RunConfig, ds_config: dict, extra: dict) -> None:
    record = {
        "config": to_dict(cfg),
        "ds_config": ds_config,
        "git_hash": git_hash(),
        "argv": sys.argv,
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        **extra,
    }
    (run_dir / "run_config.json").write_text(json.dumps(record, indent=1, default=str))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))  # what --resume uses


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:  # pragma: no cover
        return float("nan")
