"""``curvscope.Monitor``: training bit-for-bit unchanged (parameters, gradients, optimizer state, modes, RNG), its
points against the dense Hessian, the report it writes, TensorBoard, and the Hugging Face Trainer callback."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn
from track_runs import data, dense_reference

import curvscope
from curvscope.errors import CurvscopeError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3))


def _train(monitor_out=None, steps: int = 6, every: int = 3):
    """Train with Adam (dropout and BatchNorm in train mode, so the RNG and the running statistics move); record
    everything after every step."""
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = data()
    monitor = curvscope.Monitor(net, (x[:12], y[:12]), loss="ce", optimizer=opt, every=every, out=monitor_out) \
        if monitor_out is not None else None
    torch.manual_seed(123)
    trace = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if step == 3:
            net[3].eval()  # a mode the monitor must give back as it was, module by module
        if monitor is not None:
            monitor.step(step)  # between backward and step: the gradients must stay as they are
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        trace.append({"params": [p.detach().clone() for p in net.parameters()], "grads": grads,
                      "buffers": [b.clone() for b in net.buffers()], "rng": torch.get_rng_state(),
                      "modes": [m.training for m in net.modules()],
                      "state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                                for k, s in opt.state_dict()["state"].items()}})
    if monitor is not None:
        monitor.close()
    return trace, monitor


def test_the_monitor_leaves_training_bit_for_bit_unchanged(tmp_path):
    plain, _ = _train()
    watched, monitor = _train(tmp_path / "curv")
    assert len(monitor.points) == 2
    for a, b in zip(plain, watched, strict=True):
        for key in ("params", "grads", "buffers"):
            assert all(torch.equal(u, v) for u, v in zip(a[key], b[key], strict=True)), key
        assert torch.equal(a["rng"], b["rng"]) and a["modes"] == b["modes"]
        for k in a["state"]:
            for n, v in a["state"][k].items():
                assert torch.equal(v, b["state"][k][n]) if torch.is_tensor(v) else v == b["state"][k][n]
    report = json.loads((tmp_path / "curv" / "report.json").read_text())
    points = report["track"]["points"]
    assert [p["step"] for p in points] == [3, 6] and (tmp_path / "curv" / "track.png").is_file()
    assert all(p["optimizer"] == "adam" and p["threshold"] == pytest.approx(38 / 0.01) for p in points)
    assert all(p["preconditioned_lambda_max"] is not None and p["checkpoint"] is None for p in points)


def test_monitor_points_against_the_dense_hessian(tmp_path):
    from track_runs import model

    net = model(0)  # float64
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
    x, y = data()
    with curvscope.Monitor(net, (x.double(), y), optimizer=opt, every=3, out=tmp_path / "m", tol=1e-10,
                           plot=False) as monitor:
        for step in range(1, 7):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x.double()), y).backward()
            opt.step()
            point = monitor.step(step)
            if step % 3:
                assert point is None
                continue
            ref = dense_reference({k: v.detach() for k, v in net.state_dict().items()})
            assert point.loss == pytest.approx(ref["loss"], rel=1e-12)
            assert point.gradient_norm == pytest.approx(ref["gradient_norm"], rel=1e-10)
            assert point.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(ref["hessian"])[-1]), rel=1e-8)
            assert point.threshold == pytest.approx(3.0 / 0.3)
    shown = curvscope.Monitor  # the lazy export is the class
    assert shown is type(monitor)
    gate = __import__("conftest").invoke("check", tmp_path / "m", "--rule", "track.points[-1].lambda_max < 1e6")
    assert gate.exit_code == 0


def test_tensorboard_scalars_and_a_clear_message_without_the_package(tmp_path, monkeypatch):
    x, y = data()
    net = _net().eval()
    try:
        import torch.utils.tensorboard  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    if not installed:
        with pytest.raises(CurvscopeError, match="curvscope\\[tensorboard\\]"):
            curvscope.Monitor(net, (x, y), every=1, out=tmp_path / "a", tensorboard=tmp_path / "tb")
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with curvscope.Monitor(net, (x, y), every=1, out=tmp_path / "b", tensorboard=tmp_path / "tb", lr=0.1,
                           plot=False) as monitor:
        monitor.step(5)
    tags = {w[0]: w for w in written if len(w) == 3}
    assert tags["curvscope/lambda_max"][2] == 5 and tags["curvscope/threshold"][1] == pytest.approx(20.0)
    assert written[0] == ("dir", str(tmp_path / "tb")) and written[-1] == ("closed",)


def test_bad_arguments(tmp_path):
    x, y = data()
    net = _net()
    with pytest.raises(CurvscopeError, match="every"):
        curvscope.Monitor(net, (x, y), every=0, out=tmp_path)
    with pytest.raises(CurvscopeError, match="labels"):
        curvscope.Monitor(net, {"x": x}, out=tmp_path)
    with pytest.raises(CurvscopeError, match="curvature"):
        curvscope.Monitor(net, (x, y), out=tmp_path, curvature="fisher")


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(1))
    return transformers, transformers.GPT2LMHeadModel(config), ids


def test_the_callback_drives_a_monitor_with_trainer_style_param_groups(tmp_path):
    transformers, net, ids = _gpt2()
    from curvscope.integrations.transformers import CurvscopeCallback

    decay = [p for n, p in net.named_parameters() if "bias" not in n and "ln" not in n]
    rest = [p for n, p in net.named_parameters() if "bias" in n or "ln" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3)
    callback = CurvscopeCallback({"input_ids": ids[:8], "labels": ids[:8]}, every=2, out=tmp_path / "c",
                                 plot=False)
    state, control = types.SimpleNamespace(global_step=0), transformers.TrainerControl()
    net.train()
    for step in range(1, 5):
        opt.zero_grad()
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        state.global_step = step
        callback.on_step_end(None, state, control, model=net, optimizer=opt)
    callback.on_train_end(None, state, control)
    assert net.training
    points = json.loads((tmp_path / "c" / "report.json").read_text())["track"]["points"]
    assert [p["step"] for p in points] == [2, 4]
    assert all(p["optimizer"] == "adamw" and p["preconditioned_lambda_max"] > 0 for p in points)
    assert any("out of named_parameters() order" in note for note in points[0]["notes"])


def test_hugging_face_trainer_callback_and_track_on_its_checkpoints(tmp_path):
    pytest.importorskip("accelerate")  # the Trainer needs it (transformers[torch])
    transformers, net, ids = _gpt2()
    from conftest import invoke
    from safetensors.torch import save_file

    from curvscope.integrations.transformers import CurvscopeCallback

    train = [{"input_ids": row, "labels": row} for row in ids]
    batch = {"input_ids": ids[:8], "labels": ids[:8]}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4,
                                          per_device_train_batch_size=4, learning_rate=1e-3,
                                          lr_scheduler_type="constant", save_strategy="steps", save_steps=2,
                                          report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True,
                                          seed=0, data_seed=0)
    callback = CurvscopeCallback(batch, every=2, out=tmp_path / "curv", plot=False)
    transformers.Trainer(model=net, args=args, train_dataset=train, callbacks=[callback]).train()
    monitored = json.loads((tmp_path / "curv" / "report.json").read_text())["track"]["points"]
    assert [p["step"] for p in monitored] == [2, 4]
    assert all(p["optimizer"] == "adamw" and p["preconditioned_lambda_max"] is not None for p in monitored)
    assert all(p["threshold"] == pytest.approx(38 / 1e-3) for p in monitored)

    save_file({"input_ids": batch["input_ids"].clone(), "labels": batch["labels"].clone()},
              str(tmp_path / "tokens.safetensors"))
    result = invoke("track", tmp_path / "trainer", "--data", tmp_path / "tokens.safetensors", "--batch-size", "8",
                    "--device", "cpu", "--out", tmp_path / "tracked", "--no-plot")
    assert result.exit_code == 0, result.stderr
    tracked = json.loads((tmp_path / "tracked" / "report.json").read_text())["track"]["points"]
    assert [p["step"] for p in tracked] == [2, 4]
    for a, b in zip(monitored, tracked, strict=True):  # the same parameters, batch and optimizer state
        for key in ("loss", "lambda_max", "preconditioned_lambda_max", "threshold"):
            assert b[key] == pytest.approx(a[key], rel=2e-3), key
