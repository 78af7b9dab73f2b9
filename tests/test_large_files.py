"""Data files larger than memory: only the rows a batch uses are read (safetensors slices, memory-mapped .npz
members and .pt files, Parquet row groups), and ``curvscope info`` on a 200 MB file stays in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_KWARGS
from safetensors.torch import save_file

from curvscope.errors import CurvscopeError
from curvscope.io import files
from curvscope.io.load import load_problem

N = 40


@pytest.fixture
def samples():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 4, generator=g), torch.arange(N) % 3


@pytest.fixture
def lazy(monkeypatch):
    """Every data file counts as large."""
    monkeypatch.setattr(files, "LAZY_BYTES", 0)


def write(path, x, y):
    if path.suffix == ".safetensors":
        save_file({"x": x, "y": y}, str(path))
    elif path.name.endswith("-compressed.npz"):
        np.savez_compressed(path, x=x.numpy(), y=y.numpy())
    elif path.suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    else:
        torch.save({"x": x, "y": y}, path)
    return path


def load(data, **kw):
    return load_problem(data=data, model="mlp", model_kwargs=TINY_KWARGS, dtype="float64", **kw)


@pytest.mark.parametrize("name", ["d.safetensors", "d.npz", "d-compressed.npz", "d.pt"])
def test_lazy_files_read_the_same_rows(tmp_path, samples, lazy, name):
    x, y = samples
    path = write(tmp_path / name, x, y)
    for kw in ({"batch_size": 7}, {"batch_size": 9, "shuffle": True, "seed": 2}):
        problem = load(path, **kw)
        idx = problem.info["batch_indices"]
        torch.testing.assert_close(problem.inputs, x[idx].double(), rtol=0, atol=0)
        assert problem.targets.tolist() == y[idx].tolist()
        assert any("only the rows used are read" in n for n in problem.info["data_notes"])
    more = problem.batch_from_dataset(torch.tensor([39, 0, 17]))
    torch.testing.assert_close(more.inputs, x[[39, 0, 17]].double(), rtol=0, atol=0)
    if name == "d-compressed.npz":
        assert any("stored compressed: read whole" in n for n in problem.info["data_notes"])


def test_only_the_batch_rows_are_read_from_safetensors(tmp_path, samples, lazy, monkeypatch):
    x, y = samples
    path = write(tmp_path / "d.safetensors", x, y)
    read: list[tuple[int, int, int]] = []
    real = files.read_rows

    def spy(path, start, row_bytes, runs):
        read.extend((row_bytes, a, b) for a, b in runs)
        return real(path, start, row_bytes, runs)

    monkeypatch.setattr(files, "read_rows", spy)
    problem = load(path, batch_size=5, shuffle=True, seed=1)
    rows = {r for _, a, b in read for r in range(a, b)}
    assert rows == {0, *problem.info["batch_indices"]}  # row 0 once for the schema, then the batch
    read.clear()
    problem.batch_from_dataset(torch.tensor([30, 31, 32, 10]))
    assert sorted(read) == [(8, 10, 11), (8, 30, 33), (16, 10, 11), (16, 30, 33)]  # y int64, x 4 floats


def test_npz_members_are_memory_mapped_and_rows_are_checked_when_read(tmp_path, samples, lazy):
    x, y = samples
    x = x.clone()
    x[30, 1] = float("nan")
    path = write(tmp_path / "d.npz", x, y)
    source = files.open_data_file(path)
    assert isinstance(source.columns["x"].array, np.memmap)
    assert load(path, batch_size=10).batch_size == 10  # the NaN row is not used
    with pytest.raises(CurvscopeError, match=r"d\.npz: inputs 'x' contain NaN or Inf \(1 samples affected\)"):
        load(path, batch_size=10, shuffle=True, seed=0, ).batch_from_dataset(torch.tensor([29, 30]))


def test_parquet_reads_only_the_row_groups_of_the_batch(tmp_path, samples, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y = samples
    pq.write_table(pa.table({"x": x.tolist(), "y": y.tolist()}), tmp_path / "d.parquet", row_group_size=8)
    groups: list[int] = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *a, **kw):
        groups.append(i)
        return real(self, i, *a, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    problem = load(tmp_path / "d.parquet", batch_size=4)
    assert set(groups) == {0}
    torch.testing.assert_close(problem.inputs, x[:4].double(), rtol=1e-7, atol=0)  # stored as float64 lists
    groups.clear()
    problem.batch_from_dataset(torch.tensor([33, 34]))
    assert set(groups) == {4}


def test_info_on_a_200_mb_file_stays_in_bounded_memory(tmp_path):
    """A 200 MB safetensors file (50,000 samples of 1,000 floats): `info` reads 128 rows; its peak memory is that
    of the same command on a tiny file, plus far less than the file."""
    rows, features = 50_000, 1_000
    save_file({"x": torch.zeros(rows, features), "y": torch.zeros(rows, dtype=torch.int64)},
              str(tmp_path / "big.safetensors"))
    save_file({"x": torch.zeros(200, features), "y": torch.zeros(200, dtype=torch.int64)},
              str(tmp_path / "small.safetensors"))
    kwargs = json.dumps({**TINY_KWARGS, "in_features": features})
    probe = ("import resource, sys; from curvscope.cli import main; sys.argv = ['curvscope'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")

    def peak_kib(data) -> int:
        done = subprocess.run([sys.executable, "-c", probe, "info", "--data", str(data), "--model", "mlp",
                               "--model-kwargs", kwargs, "--device", "cpu"], capture_output=True, text=True,
                              cwd=ROOT, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr
        assert "batch" in done.stdout
        return int(done.stderr.split("PEAK")[-1].split()[0])

    small, big = peak_kib(tmp_path / "small.safetensors"), peak_kib(tmp_path / "big.safetensors")
    assert big - small < 50 * 1024, (small, big)  # KiB: well under the 200 MB file
