"""Launching under ``torchrun`` and the collectives of a ``torch.distributed`` process group, with error agreement.

This module knows nothing of V or the Gram: how the columns are split over the ranks, and what each rank
computes, is :class:`curvscope.curvature.gram.layout.ShardedLayout`'s business. Here:

- launching: :func:`torchrun_env` (what torchrun says about this process), :func:`launch_device` (this rank's
  device), :func:`init_from_env` (the default process group, what the CLI calls under ``torchrun``; the Python
  API takes an initialized group instead), :func:`shutdown`;
- :class:`Comm`: a process group with the collectives the engine uses (sums, maxima, gathers of rows,
  broadcasts of nested tensors and dataclasses, point to point).

Errors: local work runs inside :meth:`Comm.stage`, which all-reduces an error flag before the next collective;
when any rank failed, every rank raises the first failing rank's error (a :class:`CurvscopeError` stays one,
anything else becomes :class:`RemoteError`), so all ranks end together with one message instead of hanging.
``docs/distributed.md`` has the launch commands and the cost model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvscope.errors import CurvscopeError

TIMEOUT_ENV = "CURVSCOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


class RemoteError(RuntimeError):
    """An unexpected error on another rank, raised on every rank so that all of them stop together."""


class LocalRankError(CurvscopeError):
    """Bad input that concerns this rank only (its node has too few GPUs): the other ranks cannot know."""


# -- launching under torchrun -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """What ``torchrun`` says about this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def primary(self) -> bool:
        """This is rank 0 (the process that writes the report)."""
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
                                 "start at most one process per GPU on each node")
        return torch.device("cuda", launch.local_rank)
    if want in ("auto", "cpu"):
        return torch.device("cpu")
    if want == "cuda":
        raise CurvscopeError("device cuda: no CUDA GPU is available on this machine (use the cpu)")
    raise CurvscopeError(f"device {want}: with several processes the device is auto, cuda or cpu "
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
class _DataclassSpec:
    """A dataclass instance's place in a broadcast tree: its class and its ``init`` fields."""

    cls: type
    fields: dict[str, Any]


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
        """A :class:`Comm` on an initialized ``process_group`` for a problem on ``device``.

        Collectives run on ``device`` when the backend is NCCL and ``device`` is CUDA, otherwise on the CPU (gloo).

        Raises:
            CurvscopeError: ``torch.distributed`` is not initialized, or an NCCL-only group with a non-CUDA device.
        """
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
        """This is rank 0 of the group."""
        return self.rank == 0

    def global_rank(self, rank: int) -> int:
        """The global rank (what ``torch.distributed`` calls take) of ``rank`` in this group."""
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
        """Collective: the largest ``value`` over the ranks."""
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def all_reduce_min(self, value: float) -> float:
        """Collective: the smallest ``value`` over the ranks."""
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

    def sum_to_all(self, t: Tensor) -> Tensor:
        """Collective: the sum of every rank's ``t``, bitwise the same on every rank (reduced on rank 0, then
        broadcast), for iterations whose control flow must agree across ranks (Lanczos)."""
        flat = self._to_comm(t).clone()
        dist.reduce(flat, dst=self.global_rank(0), group=self.group)
        dist.broadcast(flat, src=self.global_rank(0), group=self.group)
        return flat.to(t.device)

    def all_gather_rows(self, local: Tensor, bounds: Sequence[int]) -> Tensor:
        """Concatenate every rank's ``(b[r+1] - b[r], ...)`` rows in rank order (rows padded to the largest)."""
        rows = max(bounds[r + 1] - bounds[r] for r in range(self.world))
        padded = torch.zeros(rows, *local.shape[1:], dtype=local.dtype, device=self.comm_device)
        padded[:local.shape[0]] = local.detach().to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:bounds[r + 1] - bounds[r]] for r, p in enumerate(parts)]).to(local.device)

    def broadcast_tree(self, tree: Any, src: int) -> Any:
        """``tree`` (nested dicts/lists/tuples/dataclasses of tensors and picklable values) from rank ``src`` to
        every rank.

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
        """Send ``t`` to rank ``dst`` of the group (point to point; ``dst`` receives with :meth:`recv_into`)."""
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
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return _DataclassSpec(type(tree), {f.name: _strip(getattr(tree, f.name), tensors)
                                           for f in dataclasses.fields(tree) if f.init})
    if isinstance(tree, dict):
        return {k: _strip(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_strip(v, tensors) for v in tree)
    return tree


def _specs(skeleton: Any) -> Iterator[_TensorSpec]:
    if isinstance(skeleton, _TensorSpec):
        yield skeleton
    elif isinstance(skeleton, _DataclassSpec):
        yield from _specs(skeleton.fields)
    elif isinstance(skeleton, dict):
        for v in skeleton.values():
            yield from _specs(v)
    elif isinstance(skeleton, list | tuple):
        for v in skeleton:
            yield from _specs(v)


def _fill(skeleton: Any, tensors: Iterator[Tensor]) -> Any:
    if isinstance(skeleton, _TensorSpec):
        return next(tensors)
    if isinstance(skeleton, _DataclassSpec):
        return skeleton.cls(**_fill(skeleton.fields, tensors))
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(_fill(v, tensors) for v in skeleton)
    return skeleton


def stage(comm: Comm | None) -> contextlib.AbstractContextManager:
    """``comm.stage()``, or a no-op without a process group (the single-process path)."""
    return comm.stage() if comm is not None else contextlib.nullcontext()
