"""The spectrum on several processes with ``torch.distributed``: sharding, collectives, error agreement.

Every rank holds the same :class:`~curvscope.problem.Problem` (the model and the whole batch of N samples: the
inputs are small next to V) and works on its contiguous slice of the samples: rank r of R owns the batch
samples ``[r N // R, (r + 1) N // R)`` (forward pass, per-sample gradients) and the curvature samples
``[r N_V // R, (r + 1) N_V // R)`` of the ``N_V`` samples that build V (all N, or the first K with
sub-sampling), i.e. the columns ``v_nk`` of those samples. Nobody holds all of V:

- Gram (:func:`block_rows`): for each stage (all ghost layers together, then one parameter chunk of the
  generic path at a time) every rank computes the factors of its own columns (layer inputs ``a`` and deltas,
  or materialized rows of V). Then each rank in turn *broadcasts* its factors and every rank contracts them
  with its own: rank r accumulates its *block row* of the extended Gram (its rows of ``vv``, ``vg``, ``gg``
  against all columns). A rank holds its own factors and one visiting rank's at a time.
- Eigen-decomposition: group i's block rows are sent to rank ``i mod R`` (:func:`assemble`), which alone holds
  that group's ``(N_V K)^2`` Gram, decomposes it and computes the directional quantities; the results (eigen-
  values, top-k Gram eigenvectors, gamma/lambda, SNRs) are broadcast, so every rank returns the same result.
- Batch loss and gradient: the outputs ``(N, C)`` are all-gathered (so that the columns and Monte-Carlo draws
  are exactly the single-process ones), the gradient is all-reduced.

Errors: local work runs inside :meth:`Comm.stage`, which all-reduces an error flag before the next collective;
when any rank failed, every rank raises the first failing rank's error (a :class:`CurvscopeError` stays one,
anything else becomes :class:`RemoteError`), so all ranks end together with one message instead of hanging.

The engine never initializes a process group itself except in :func:`init_from_env` (what the CLI calls under
``torchrun``); the Python API takes an initialized one. ``docs/distributed.md`` has the launch commands and the
cost model.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvscope.curvature.columns import Columns, gradient_seeds, make_columns
from curvscope.curvature.gram import GramAccumulator, GroupGram, _as_slice, _generic_contributions
from curvscope.curvature.memory import ColumnBlock, MemoryPlan
from curvscope.errors import CurvscopeError

TIMEOUT_ENV = "CURVSCOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


class RemoteError(RuntimeError):
    """An unexpected error on another rank, raised on every rank so that all of them stop together."""


class LocalRankError(CurvscopeError):
    """Bad input that concerns this rank only (its node has too few GPUs): the other ranks cannot know."""


def shard_bounds(n: int, world: int) -> list[int]:
    """``(R + 1,)`` boundaries: rank r owns ``[b[r], b[r + 1])`` of n items (sizes differ by at most one)."""
    return [r * n // world for r in range(world + 1)]


# -- launching under torchrun -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """What ``torchrun`` says about this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def primary(self) -> bool:
        return self.rank == 0


def torchrun_env() -> Launch | None:
    """The torchrun environment, or None when not launched by torchrun (or with a single process)."""
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        return None
    return Launch(rank, world, local) if world > 1 else None


def launch_device(launch: Launch, device: str | None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when GPUs exist, else the CPU."""
    want = "auto" if device is None else str(device)
    if want in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise LocalRankError(f"LOCAL_RANK {launch.local_rank} but only {count} GPU(s) are visible on this node: "
                                 "lower torchrun's --nproc-per-node")
        return torch.device("cuda", launch.local_rank)
    if want in ("auto", "cpu"):
        return torch.device("cpu")
    if want == "cuda":
        raise CurvscopeError("--device cuda: no CUDA GPU is available on this machine (use --device cpu)")
    raise CurvscopeError(f"--device {want}: under torchrun use --device auto, cuda or cpu "
                         "(rank r then works on cuda:LOCAL_RANK)")


def init_from_env(launch: Launch, device: torch.device) -> dist.ProcessGroup:
    """Initialize the default process group from torchrun's environment (``env://``): NCCL for a CUDA device,
    gloo for the CPU. The timeout of collectives is ``$CURVSCOPE_DIST_TIMEOUT`` seconds (default 1800: one rank
    may eigen-decompose a large Gram while the others wait)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        except ValueError:
            raise CurvscopeError(f"${TIMEOUT_ENV} must be a number of seconds") from None
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=launch.rank, world_size=launch.world_size, timeout=timedelta(seconds=timeout))
    return dist.group.WORLD


def shutdown() -> None:
    """Destroy the default process group if it exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- communication with error agreement ---------------------------------------------------------------------

@dataclass
class _TensorSpec:
    """A tensor's place in a broadcast tree."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


@dataclass
class Comm:
    """A process group with the collectives the engine uses.

    Attributes:
        device: where results live (the problem's device); comm_device: where collectives run (the CUDA device
            for NCCL, the CPU for gloo).
    """

    group: Any
    rank: int
    world: int
    device: torch.device
    comm_device: torch.device

    @classmethod
    def create(cls, process_group: Any, device: torch.device) -> Comm:
        if process_group is None or not (dist.is_available() and dist.is_initialized()):
            raise CurvscopeError("process_group: torch.distributed is not initialized "
                                 "(call torch.distributed.init_process_group first)")
        backend = str(dist.get_backend(process_group))
        if "nccl" in backend and device.type == "cuda":  # "nccl", or "cpu:gloo,cuda:nccl"
            comm_device = device
        elif backend == "nccl":
            raise CurvscopeError(f"process_group: the NCCL backend needs a CUDA problem, got device {device}")
        else:
            comm_device = torch.device("cpu")
        return cls(process_group, dist.get_rank(process_group), dist.get_world_size(process_group), device,
                   comm_device)

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def global_rank(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not dist.group.WORLD else rank

    # -- agreeing on failures ------------------------------------------------------------------------------
    def agree(self, error: BaseException | None) -> None:
        """Collective: returns when no rank failed; else raises the first failing rank's error everywhere."""
        flag = torch.tensor([self.world if error is None else self.rank], dtype=torch.int64,
                            device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        first = int(flag.item())
        if first == self.world:
            return
        payload: list[Any] = [None]
        if self.rank == first:
            payload = [(isinstance(error, CurvscopeError), type(error).__name__, str(error).strip())]
        dist.broadcast_object_list(payload, src=self.global_rank(first), group=self.group, device=self.comm_device)
        if self.rank == first and error is not None:
            raise error
        bad_input, name, message = payload[0]
        if bad_input:
            raise CurvscopeError(f"rank {first}: {message}")
        raise RemoteError(f"rank {first}: {name}: {message}" if message else f"rank {first}: {name}")

    @contextlib.contextmanager
    def stage(self) -> Iterator[None]:
        """Run local work, then agree with every rank on success (raising the first failure on all ranks).
        Every rank must enter the same stages in the same order; collectives go between stages."""
        try:
            yield
        except Exception as exc:
            self.agree(exc)
            raise
        self.agree(None)

    # -- collectives ---------------------------------------------------------------------------------------
    def _to_comm(self, t: Tensor) -> Tensor:
        return t.detach().to(self.comm_device).contiguous()

    def all_reduce_max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def all_reduce_min(self, value: float) -> float:
        return -self.all_reduce_max(-value)

    def all_reduce_sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum same-named tensors over ranks (one collective per dtype); returns new tensors."""
        out: dict[str, Tensor] = {}
        for dtype in {t.dtype for t in tensors.values()}:
            names = [n for n, t in tensors.items() if t.dtype == dtype]
            flat = torch.cat([tensors[n].detach().reshape(-1).to(self.comm_device) for n in names]) if names \
                else torch.zeros(0, dtype=dtype, device=self.comm_device)
            dist.all_reduce(flat, group=self.group)
            i = 0
            for n in names:
                t = tensors[n]
                out[n] = flat[i:i + t.numel()].reshape(t.shape).to(t.device)
                i += t.numel()
        return {n: out[n] for n in tensors}

    def all_gather_rows(self, local: Tensor, bounds: Sequence[int]) -> Tensor:
        """Concatenate every rank's ``(b[r+1] - b[r], ...)`` rows in rank order (rows padded to the largest)."""
        rows = max(bounds[r + 1] - bounds[r] for r in range(self.world))
        padded = torch.zeros(rows, *local.shape[1:], dtype=local.dtype, device=self.comm_device)
        padded[:local.shape[0]] = local.detach().to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:bounds[r + 1] - bounds[r]] for r, p in enumerate(parts)]).to(local.device)

    def broadcast_tree(self, tree: Any, src: int) -> Any:
        """``tree`` (nested dicts/lists/tuples of tensors and picklable values) from rank ``src`` to every rank.

        The structure goes as one pickled object, then each tensor with ``dist.broadcast``. Receivers get CUDA
        tensors on ``self.device``, CPU tensors on the CPU. ``src`` returns its own ``tree``.
        """
        tensors: list[Tensor] = []
        meta: list[Any] = [_strip(tree, tensors) if self.rank == src else None]
        dist.broadcast_object_list(meta, src=self.global_rank(src), group=self.group, device=self.comm_device)
        gsrc = self.global_rank(src)
        if self.rank == src:
            for t in tensors:
                if t.numel():
                    dist.broadcast(self._to_comm(t), src=gsrc, group=self.group)
            return tree
        received: list[Tensor] = []
        for spec in _specs(meta[0]):
            buf = torch.empty(spec.shape, dtype=spec.dtype, device=self.comm_device)
            if buf.numel():
                dist.broadcast(buf, src=gsrc, group=self.group)
            received.append(buf.to("cpu" if spec.on_cpu else self.device))
        return _fill(meta[0], iter(received))

    def send(self, t: Tensor, dst: int) -> None:
        dist.send(self._to_comm(t), dst=self.global_rank(dst), group=self.group)

    def recv_into(self, target: Tensor, src: int) -> None:
        """Receive into ``target`` (a contiguous tensor or row slice)."""
        if target.device == self.comm_device and target.is_contiguous():
            dist.recv(target, src=self.global_rank(src), group=self.group)
            return
        buf = torch.empty(target.shape, dtype=target.dtype, device=self.comm_device)
        dist.recv(buf, src=self.global_rank(src), group=self.group)
        target.copy_(buf)


def _strip(tree: Any, tensors: list[Tensor]) -> Any:
    if isinstance(tree, Tensor):
        tensors.append(tree)
        return _TensorSpec(tuple(tree.shape), tree.dtype, tree.device.type == "cpu")
    if isinstance(tree, dict):
        return {k: _strip(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_strip(v, tensors) for v in tree)
    return tree


def _specs(skeleton: Any) -> Iterator[_TensorSpec]:
    if isinstance(skeleton, _TensorSpec):
        yield skeleton
    elif isinstance(skeleton, dict):
        for v in skeleton.values():
            yield from _specs(v)
    elif isinstance(skeleton, list | tuple):
        for v in skeleton:
            yield from _specs(v)


def _fill(skeleton: Any, tensors: Iterator[Tensor]) -> Any:
    if isinstance(skeleton, _TensorSpec):
        return next(tensors)
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(_fill(v, tensors) for v in skeleton)
    return skeleton


def stage(comm: Comm | None) -> contextlib.AbstractContextManager:
    """``comm.stage()``, or a no-op without a process group (the single-process path)."""
    return comm.stage() if comm is not None else contextlib.nullcontext()


# -- the shard of one problem -------------------------------------------------------------------------------

def _fingerprint(problem) -> Tensor:
    """``(9,)`` float64: sizes and sums of the batch and parameters, to check that every rank has the same."""
    inputs, targets = problem.inputs.detach().double(), problem.targets.detach().double()
    params = [p.detach().double() for p in problem.params.values()]
    return torch.tensor([problem.batch_size, problem.num_outputs, problem.num_params, len(params),
                         float(inputs.sum()), float(inputs.abs().sum()), float(targets.abs().sum()),
                         float(sum(p.sum() for p in params)), float(sum(p.abs().sum() for p in params))],
                        dtype=torch.float64)


def _sizes(f: Tensor) -> str:
    return f"{int(f[0])} samples, {int(f[1])} outputs, {int(f[2]):,} parameters"


@dataclass
class Shard(Comm):
    """One rank's part of a problem: contiguous slices of the batch and of the curvature samples."""

    num_samples: int = 0
    batch_bounds: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, process_group: Any, problem, check: bool = True) -> Shard:
        """The shard of ``problem`` on this rank. With ``check`` (a collective), refuses ranks whose problems
        differ (every rank must pass the same full batch and parameters)."""
        comm = Comm.create(process_group, problem.device)
        shard = cls(comm.group, comm.rank, comm.world, comm.device, comm.comm_device, problem.batch_size,
                    shard_bounds(problem.batch_size, comm.world))
        if check:
            with shard.stage():
                mine = _fingerprint(problem)
            every = shard.all_gather_rows(mine.unsqueeze(0).to(shard.comm_device), list(range(shard.world + 1)))
            every = every.cpu()
            for r in range(shard.world):
                same = bool((every[r, :4] == every[0, :4]).all()) and bool(torch.allclose(
                    every[r, 4:], every[0, 4:], rtol=1e-6, atol=0.0))
                if not same:
                    raise CurvscopeError(
                        f"process_group: rank {r}'s problem differs from rank 0's ({_sizes(every[r])} vs "
                        f"{_sizes(every[0])}, or other values): every rank must pass the same model and full batch")
        return shard

    def batch_range(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        return self.batch_bounds[r], self.batch_bounds[r + 1]

    def curvature_bounds(self, columns: Columns) -> list[int]:
        return shard_bounds(columns.num_samples, self.world)

    def curvature_range(self, columns: Columns, rank: int | None = None) -> tuple[int, int]:
        b = self.curvature_bounds(columns)
        r = self.rank if rank is None else rank
        return b[r], b[r + 1]

    # -- columns and blocks --------------------------------------------------------------------------------
    def local_columns(self, columns: Columns, with_gradients: bool, rank: int | None = None) -> int:
        c0, c1 = self.curvature_range(columns, rank)
        b0, b1 = self.batch_range(rank)
        return (c1 - c0) * columns.per_sample + ((b1 - b0) if with_gradients else 0)

    def held_columns(self, columns: Columns, with_gradients: bool) -> int:
        """Columns whose factors a rank holds at once when everything fits: its own and one visitor's."""
        return 2 * max(self.local_columns(columns, with_gradients, r) for r in range(self.world))

    def blocking(self, plan: MemoryPlan, columns: Columns, with_gradients: bool, kept_bytes: float,
                 work_bytes: float) -> tuple[int, int]:
        """``(columns per block, own blocks held at once)``, as :meth:`MemoryPlan.blocking` for the columns a
        rank holds (its own plus a visiting block)."""
        return plan.blocking(self.held_columns(columns, with_gradients), kept_bytes, work_bytes)

    def blocks(self, columns: Columns, grad_seeds: Tensor | None, max_columns: int, rank: int | None = None
               ) -> list[ColumnBlock]:
        """Rank ``rank``'s columns of ``[V, G]`` cut into blocks of at most ``max_columns`` columns, with their
        global extended indices (as :func:`~curvscope.curvature.memory.column_blocks` for the whole batch)."""
        N_V, K = columns.num_samples, columns.per_sample
        num_v = N_V * K
        c0, c1 = self.curvature_range(columns, rank)
        b0, b1 = self.batch_range(rank)
        samples = columns.samples[c0:c1]
        v_index = torch.arange(c0 * K, c1 * K, device=samples.device).reshape(c1 - c0, K)
        units: list[tuple[Tensor, Tensor, Tensor]] = []
        if grad_seeds is None:
            units.append((samples, columns.seeds[c0:c1], v_index))
        elif N_V == grad_seeds.shape[0]:  # same samples: a sample's gradient seed joins its K seeds
            units.append((samples, torch.cat([columns.seeds[c0:c1], grad_seeds[samples]], dim=1),
                          torch.cat([v_index, num_v + samples.unsqueeze(1)], dim=1)))
        else:
            mine = torch.arange(b0, b1, device=samples.device)
            units += [(samples, columns.seeds[c0:c1], v_index),
                      (mine, grad_seeds[b0:b1], (num_v + mine).unsqueeze(1))]
        out = []
        for idx, seeds, index in units:
            m, k = index.shape
            if m == 0:
                continue
            if max_columns >= k:
                step = max_columns // k
                out += [ColumnBlock(idx[i:i + step], seeds[i:i + step], index[i:i + step].reshape(-1))
                        for i in range(0, m, step)]
            else:
                out += [ColumnBlock(idx[n:n + 1], seeds[n:n + 1, c:c + max_columns], index[n, c:c + max_columns])
                        for n in range(m) for c in range(0, k, max_columns)]
        return out

    def pairwise(self, columns: Columns, grad_seeds: Tensor | None, max_columns: int,
                 compute: Callable[[ColumnBlock], Any], contract: Callable[[ColumnBlock, Any, ColumnBlock, Any], None],
                 held: int) -> None:
        """The distributed :func:`~curvscope.curvature.memory.pairwise`: ``contract(own, F_own, other, F_other)``
        for each of this rank's blocks and *every* block of every rank (this rank's block rows).

        A stripe of ``held`` own blocks is computed and kept; then every rank's blocks are broadcast one at a
        time by their owner (computed again unless in the owner's current stripe) and contracted with the stripe.
        With everything fitting (the usual case) each rank has one block, computed once, and R broadcasts.
        """
        every = [self.blocks(columns, grad_seeds, max_columns, r) for r in range(self.world)]
        mine = every[self.rank]
        stripes = max(1, *(math.ceil(len(b) / held) for b in every))
        for t in range(stripes):
            stripe: list[tuple[ColumnBlock, Any]] = []
            with self.stage():
                stripe = [(b, compute(b)) for b in mine[t * held:(t + 1) * held]]
            for src, blocks in enumerate(every):
                for j, block in enumerate(blocks):
                    factors = None
                    with self.stage():
                        if src == self.rank:
                            k = j - t * held
                            factors = stripe[k][1] if 0 <= k < len(stripe) else compute(block)
                    factors = self.broadcast_tree(factors, src)
                    with self.stage():
                        for own, own_factors in stripe:
                            contract(own, own_factors, block, factors)
                    del factors


# -- block rows of the Gram ---------------------------------------------------------------------------------

@dataclass
class RowGroupGram:
    """One rank's block row of a group's extended Gram (float64): the rows of its own columns.

    Attributes:
        num_v: V columns in all (``N_V * K``); v_start: this rank's first V column; g_start: its first sample.
        vv: ``(n_v, N_V*K)`` rows of ``V_P^T V_P``; vg: ``(n_v, N)`` rows of ``V_P^T G_P``; gg: ``(n_g, N)`` rows
            of ``G_P^T G_P`` (``n_v``, ``n_g``: this rank's V columns and batch samples).
    """

    name: str
    param_names: tuple[str, ...]
    num_v: int
    v_start: int
    g_start: int
    vv: Tensor
    vg: Tensor | None = None
    gg: Tensor | None = None

    def add_rows(self, rows: Tensor, cols: Tensor, block: Tensor) -> None:
        """Add ``block`` ``(r, c)`` at extended indices ``rows`` (this rank's) x ``cols`` (any). The rows of
        gradient columns against V columns are the transposes of other ranks' ``vg`` rows and are skipped."""
        rv, cv = rows < self.num_v, cols < self.num_v
        parts = [(self.vv, rows[rv] - self.v_start, cols[cv], rv, cv)]
        if self.vg is not None:
            parts += [(self.vg, rows[rv] - self.v_start, cols[~cv] - self.num_v, rv, ~cv),
                      (self.gg, rows[~rv] - self.num_v - self.g_start, cols[~cv] - self.num_v, ~rv, ~cv)]
        for target, ri, ci, rmask, cmask in parts:
            if ri.numel() and ci.numel():
                sub = block[rmask][:, cmask]
                rs, cs = _as_slice(ri), _as_slice(ci)
                if rs is not None and cs is not None:
                    target[rs, cs] += sub
                else:
                    target.index_put_((ri.unsqueeze(1), ci.unsqueeze(0)), sub, accumulate=True)


class RowGramAccumulator(GramAccumulator):
    """:class:`~curvscope.curvature.gram.GramAccumulator` of one rank's block rows (:class:`RowGroupGram`)."""

    def __init__(self, groups: Sequence[tuple[str, Sequence[str]]], shard: Shard, columns: Columns,
                 num_g: int | None):
        c0, c1 = shard.curvature_range(columns)
        b0, b1 = shard.batch_range()
        K, num_v = columns.per_sample, columns.num_columns
        n_v, n_g = (c1 - c0) * K, b1 - b0

        def zeros(rows: int, cols: int) -> Tensor:
            return torch.zeros(rows, cols, dtype=torch.float64, device=shard.device)

        self.groups = [RowGroupGram(name, tuple(names), num_v, c0 * K, b0, zeros(n_v, num_v),
                                    None if num_g is None else zeros(n_v, num_g),
                                    None if num_g is None else zeros(n_g, num_g))
                       for name, names in groups]
        self.owners = {}
        for g in self.groups:
            for n in g.param_names:
                self.owners.setdefault(n, []).append(g)


def common_plan(comm: Comm, plan: MemoryPlan) -> MemoryPlan:
    """The same plan on every rank: the smallest budget (so that block sizes agree)."""
    return MemoryPlan(budget=int(comm.all_reduce_min(float(plan.budget))), activation_factor=plan.activation_factor)


def block_rows(problem, groups: Sequence[tuple[str, Sequence[str]]], shard: Shard, with_gradients: bool = False,
               mc_samples: int = 0, subsample: int | None = None, seed: int = 0, ghost: bool = True,
               plan: MemoryPlan | None = None, progress: Callable[[int], None] | None = None
               ) -> tuple[list[RowGroupGram], Columns, Tensor]:
    """This rank's block rows of every group's extended Gram (see :func:`~curvscope.curvature.gram.compute_gram`
    for the arguments). Collective: every rank of ``shard`` calls it with the same arguments.

    Returns:
        ``(rows, columns, outputs)``: ``columns`` of all N_V samples and ``outputs`` ``(N, C)`` of the whole
        batch, the same on every rank and equal to the single-process ones.
    """
    from curvscope.curvature import ghost as ghost_rules

    plan = common_plan(shard, plan or MemoryPlan.default(problem.device))
    progress = progress or (lambda _n: None)
    b0, b1 = shard.batch_range()
    with shard.stage():
        with torch.no_grad():
            local = problem.forward(inputs=problem.inputs[b0:b1]) if b1 > b0 else torch.zeros(
                0, problem.num_outputs, dtype=problem.dtype, device=problem.device)
    outputs = shard.all_gather_rows(local, shard.batch_bounds)
    with shard.stage():
        columns = make_columns(problem, outputs, mc_samples=mc_samples, subsample=subsample, seed=seed)
        grad_seeds = gradient_seeds(problem, outputs) if with_gradients else None
        acc = RowGramAccumulator(groups, shard, columns, problem.batch_size if with_gradients else None)
    names = [n for n in problem.params if acc.wanted(n)]
    handled: set[str] = set()
    if ghost:
        handled = ghost_rules.contribute(problem, names, columns, grad_seeds, acc, plan, shard=shard)
        if handled:
            progress(len(handled))
    rest = [n for n in names if n not in handled]
    if rest:
        _generic_contributions(problem, rest, columns, grad_seeds, acc, plan, progress, shard=shard)
    return acc.groups, columns, outputs


def assemble(rows: list[RowGroupGram], shard: Shard, columns: Columns, owners: Sequence[int],
             with_gg: bool = True) -> list[GroupGram | None]:
    """Send every group's block rows to its owner (point to point); the owner gets the full
    :class:`~curvscope.curvature.gram.GroupGram`, the other ranks None. ``rows`` is emptied as it goes (each
    rank's block rows are freed once sent). ``with_gg=False``: leave out ``gg`` (``(N, N)``; the spectrum does
    not use it)."""
    K = columns.per_sample
    v_bounds = [c * K for c in shard.curvature_bounds(columns)]
    out: list[GroupGram | None] = []
    for i, owner in enumerate(owners):
        mine = rows[i]
        parts = [("vv", v_bounds)]
        if mine.vg is not None:
            parts += [("vg", v_bounds)] + ([("gg", shard.batch_bounds)] if with_gg else [])
        full = None
        with shard.stage():
            if shard.rank == owner:
                num_v, num_g = mine.num_v, (mine.gg.shape[1] if mine.gg is not None else None)

                def zeros(r: int, c: int) -> Tensor:
                    return torch.zeros(r, c, dtype=torch.float64, device=shard.device)

                full = GroupGram(mine.name, mine.param_names, zeros(num_v, num_v),
                                 None if num_g is None else zeros(num_v, num_g),
                                 None if num_g is None or not with_gg else zeros(num_g, num_g))
        for r in range(shard.world):
            for attr, b in parts:
                if b[r + 1] == b[r]:
                    continue
                if shard.rank == owner == r:
                    getattr(full, attr)[b[r]:b[r + 1]] = getattr(mine, attr)
                elif shard.rank == r:
                    shard.send(getattr(mine, attr), owner)
                elif shard.rank == owner:
                    shard.recv_into(getattr(full, attr)[b[r]:b[r + 1]], r)
        rows[i] = None  # type: ignore[call-overload]
        out.append(full)
    return out


def assemble_everywhere(rows: list[RowGroupGram], shard: Shard, columns: Columns) -> list[GroupGram]:
    """Every group's full Gram on every rank (assembled on rank 0, then broadcast): for tests and small
    problems; :func:`~curvscope.curvature.spectrum.compute_spectrum` keeps each Gram on one rank."""
    grams = assemble(rows, shard, columns, [0] * len(rows))
    out = []
    for g in grams:
        tree = None if g is None else {"name": g.name, "param_names": g.param_names, "vv": g.vv, "vg": g.vg,
                                       "gg": g.gg}
        tree = shard.broadcast_tree(tree, 0)
        out.append(GroupGram(tree["name"], tuple(tree["param_names"]), tree["vv"], tree["vg"], tree["gg"]))
    return out


# -- loss and gradient ----------------------------------------------------------------------------------------

def loss_value(problem, shard: Shard, params: dict[str, Tensor] | None = None) -> float:
    """The batch loss ``L`` (mean over all N samples): per-rank sums of its samples' losses, all-reduced."""
    b0, b1 = shard.batch_range()
    with shard.stage():
        with torch.no_grad():
            local = torch.zeros((), dtype=torch.float64, device=problem.device)
            if b1 > b0:
                out = problem.forward(params, problem.inputs[b0:b1])
                local = problem.loss.per_sample(out, problem.targets[b0:b1]).to(torch.float64).sum()
    return float(shard.all_reduce_sum({"loss": local.reshape(1)})["loss"][0]) / problem.batch_size


def gradient(problem, shard: Shard) -> dict[str, Tensor]:
    """The batch gradient ``g = dL/dtheta`` by name: each rank differentiates ``sum_{n in shard} l_n / N``,
    then the parts are all-reduced."""
    b0, b1 = shard.batch_range()
    with shard.stage():
        if b1 > b0:
            inputs, targets = problem.inputs[b0:b1], problem.targets[b0:b1]

            def local_loss(params: dict[str, Tensor]) -> Tensor:
                return problem.loss.per_sample(problem.forward(params, inputs), targets).sum() / problem.batch_size

            grad = torch.func.grad(local_loss)(problem.params)
        else:
            grad = {n: torch.zeros_like(p) for n, p in problem.params.items()}
    return shard.all_reduce_sum(grad)
