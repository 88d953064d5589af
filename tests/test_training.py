"""The shared training scaffold: batches, resumable state, facts, and the multi-process path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from textimg.training import (
    BatchOrder,
    Engine,
    TrainingCheckpoint,
    describe_machine,
    fetch,
    frozen,
    global_rng_state,
    rounded,
    run_facts,
    set_global_rng_state,
)
from textimg.utils import evaluating, seeded


def test_batch_order_covers_each_epoch_once_and_restores_exactly():
    order = BatchOrder(10, 4, seed=0)
    first_epoch = torch.cat([order.next(), order.next()])  # 8 of 10, then a new permutation
    assert len(set(first_epoch.tolist())) == 8
    state = order.state_dict()
    ahead = [order.next() for _ in range(5)]
    again = BatchOrder(10, 4, seed=123)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ahead, [again.next() for _ in range(5)]))


def test_batch_order_shares_one_global_batch_between_processes():
    whole = BatchOrder(40, 8, seed=3)
    ranks = [BatchOrder(40, 8, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(7):  # across an epoch boundary
        batch = whole.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.sort(batch).values)
        assert torch.equal(parts[0], batch[0::2]) and torch.equal(parts[1], batch[1::2])


def test_batch_order_can_share_a_loops_generator():
    rng = torch.Generator().manual_seed(5)
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(5))[:4]
    assert torch.equal(BatchOrder(12, 4, rng=rng).next(), expected)


def test_fetch_gives_meanings_by_labels_and_none_for_tensors():
    items = [{"image": torch.zeros(3, 2, 2), "caption": "a big red star", "labels": {"shape": 1}},
             {"image": torch.ones(3, 2, 2), "caption": "a red star"}]
    images, captions, meanings = fetch(items, torch.tensor([0, 1]))
    assert images.shape == (2, 3, 2, 2) and captions == ["a big red star", "a red star"]
    assert meanings == [{"shape": 1}, "a red star"]
    assert fetch(torch.zeros(5, 3, 2, 2), torch.tensor([1, 2]))[1:] == (None, None)


def test_global_rng_state_round_trip():
    state = global_rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_global_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_checkpoint_resumes_only_the_same_run(tmp_path):
    rng = torch.Generator().manual_seed(0)
    ckpt = TrainingCheckpoint(tmp_path, "loop", {"config": {"lr": 1.0, "steps": 5}})
    assert ckpt.load(rng) is None  # nothing yet
    ckpt.save({"step": 3, "weights": torch.arange(4)}, rng)
    expected = torch.rand(2, generator=rng)
    state = TrainingCheckpoint(tmp_path, "loop", {"config": {"lr": 1.0, "steps": 5}}).load(rng)
    assert state["step"] == 3 and torch.equal(state["weights"], torch.arange(4))
    assert torch.equal(torch.rand(2, generator=rng), expected), "the loop's generator continues where it was saved"
    with pytest.raises(ValueError, match=r"differs in \['config.lr'\]"):
        TrainingCheckpoint(tmp_path, "loop", {"config": {"lr": 2.0, "steps": 5}}).load(rng)
    (tmp_path / "other.pt").write_bytes((tmp_path / "loop.pt").read_bytes())
    with pytest.raises(ValueError, match="not a other checkpoint"):
        TrainingCheckpoint(tmp_path, "other", {"config": {"lr": 1.0, "steps": 5}}).load(rng)


def test_no_checkpoint_directory_means_no_file(tmp_path):
    rng = torch.Generator()
    ckpt = TrainingCheckpoint(None, "loop", {})
    ckpt.save({"step": 1}, rng)
    assert ckpt.load(rng) is None and not list(tmp_path.iterdir())


def test_frozen_and_evaluating_restore_the_module():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    net[0].bias.requires_grad_(False)
    with frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.training and net[0].weight.requires_grad and not net[0].bias.requires_grad
    with evaluating(net):
        assert not net.training
    assert net.training


def test_seeded_initialisation_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with seeded(0):
        a = torch.nn.Linear(3, 3).weight.detach().clone()
    with seeded(0):
        b = torch.nn.Linear(3, 3).weight.detach().clone()
    assert torch.equal(a, b) and torch.equal(torch.rand(3), expected)


def test_engine_update_refuses_a_non_finite_loss_before_stepping():
    from textimg.training import NonFiniteLossError

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    engine = Engine()
    engine.step = 41
    with pytest.raises(NonFiniteLossError, match="step 41: loss"):
        engine.update((w * float("nan")).sum(), opt, "loss")
    assert torch.equal(w.detach(), torch.ones(2))
    engine.update(w.sum(), opt, "loss")
    assert torch.equal(w.detach(), torch.zeros(2))


def test_run_facts_are_written_by_code():
    facts = run_facts(command="textimg train --preset quick", steps=3, history={"loss": [0.123456789]})
    assert facts["command"] == "textimg train --preset quick" and facts["history"]["loss"] == [0.1235]
    assert {"textimg", "torch", "machine", "threads", "date", "device"} <= set(facts)
    assert facts["textimg"] == __import__("textimg").__version__ and "cores" in describe_machine()
    assert rounded({"a": [1.23456, 2], "b": "x"}) == {"a": [1.235, 2], "b": "x"}
    json.dumps(facts)  # plain JSON


# -----------------------------------------------------------------------------------------------
# Two CPU processes through Accelerate: gradients synchronised, one checkpoint writer, exact resume


@pytest.mark.skipif(sys.platform != "linux", reason="two processes that talk over loopback (gloo)")
def test_two_processes_stay_in_sync_and_resume_exactly(tmp_path):
    # torchrun starts two fresh processes (forking this one, whose OpenMP threads are busy, can hang)
    script = Path(__file__).with_name("two_process_gan.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), "4", "2"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["processes"] == r1["processes"] == 2
    for net in ("G", "D"):  # gradients were averaged: both processes hold the same networks
        assert all(torch.equal(r0["straight"][net][k], r1["straight"][net][k]) for k in r0["straight"][net])
        # stopping after 2 steps and resuming gives the same networks as 4 steps in one go
        assert all(torch.equal(r0["straight"][net][k], r0["resumed"][net][k]) for k in r0["straight"][net])
    assert r0["straight"]["g_loss"] == r0["resumed"]["g_loss"]
    assert r0["straight"]["g_loss"] != r1["straight"]["g_loss"], "each process saw its own half of the batch"
    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == ["gan_training.pt"], "one writer, one file"
