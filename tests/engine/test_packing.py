"""Packed sequences (`batching.packing`): the same samples concatenated into rows, attention
blocked between them, positions restarting per sample. A packed batch's loss and gradients
equal the padded batch's to fp32 tolerance, per token and per sample, and on the embedded
`sequences` in random order a packed batch has no padding at all."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data.batches import SampleTable, split_train_val
from pipeline.data.datasets import make_sequences
from pipeline.data.padding import batch_shape, batch_slots, pack_rows
from pipeline.engine.models import SeqTransformer
from pipeline.engine.step import loss_count, loss_sum, to_torch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def table() -> SampleTable:
    return SampleTable.from_table(make_sequences(400), feature_column=None, label_column="label",
                                  sequence_column="tokens", target_column="targets")


def _loss_and_grads(model: torch.nn.Module, batch: dict, loss: str):
    model.zero_grad()
    nb = to_torch(batch, CPU)
    total, correct = loss_sum(model(nb), nb, loss)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.item(), int(correct), loss_count(nb, loss), grads


@pytest.mark.parametrize(("loss", "per_token"), [("token_cross_entropy", True),
                                                 ("cross_entropy", False)])
@pytest.mark.parametrize("pack_tokens", [None, 160])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_packed_batch_has_the_padded_batchs_loss_and_gradients(table, loss, per_token,
                                                                 pack_tokens, checkpointing):
    positions = np.random.default_rng(3).permutation(len(table))[:24]
    padded = table.gather(positions, max_length=128)
    packed = table.gather(positions, max_length=128, packing=True, pack_tokens=pack_tokens)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # rows of several samples
    assert sorted(packed["sample_id"]) == sorted(padded["sample_id"])
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()
    torch.manual_seed(0)
    model = SeqTransformer(vocab_size=64, num_outputs=4, per_token=per_token,
                           activation_checkpointing=checkpointing).train()
    want = _loss_and_grads(model, padded, loss)
    got = _loss_and_grads(model, packed, loss)
    assert got[2] == want[2]  # the same number of loss elements (tokens or samples)
    assert got[1] == want[1]  # the same correct predictions
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    # fp32 tolerance at each tensor's scale: the gradients are sums over ~1,000 tokens, and
    # the two batches add them in different orders (rows of different lengths); the kernels'
    # summation order also differs between CPUs (on an AVX-512 machine, elements near 0 of a
    # head.weight gradient up to 74 differ by 2.7e-5, 3.6e-7 of its scale). Attention leaking
    # between packed samples moves the gradients by percent, not by 1e-5 of their scale.
    for name, g in want[3].items():
        torch.testing.assert_close(got[3][name], g, rtol=1e-4,
                                   atol=1e-5 * float(g.abs().max()), msg=name)


def test_packed_rows_keep_samples_apart_and_restart_positions(table):
    positions = np.arange(10)
    packed = table.gather(positions, packing=True, pack_tokens=100)
    lengths = table.lengths[positions]
    row, offset = pack_rows(lengths, 100)
    assert (np.bincount(row, weights=lengths) <= np.maximum(100, lengths.max())).all()
    seg, pos = packed["segment_ids"], packed["position_ids"]
    for r in range(seg.shape[0]):  # each sample: one run of its segment id, positions 0..l-1
        for s in range(1, seg[r].max() + 1):
            where = np.flatnonzero(seg[r] == s)
            assert (np.diff(where) == 1).all() and (pos[r, where] == np.arange(len(where))).all()
    order = np.lexsort((offset, row))  # per-sample keys follow the rows' order
    np.testing.assert_array_equal(packed["sample_id"], table.ids[positions][order])
    np.testing.assert_array_equal(packed["label"], table.labels[positions][order])


def test_packing_removes_the_padding_of_random_batches_on_sequences(table):
    """Micro-batches of 32 in random order from the embedded `sequences`: padded they are
    about a quarter real tokens; packed into one row each, all real (the issue's target is
    0.99); with rows of at most 512 tokens, the last row's slack remains."""
    full = SampleTable.from_table(make_sequences(), feature_column=None, label_column="label",
                                  sequence_column="tokens", target_column="targets")
    train, _ = split_train_val(len(full), full.labels, 0.2, 0)
    order = np.random.default_rng(0).permutation(train)
    real = {"padded": 0, "packed": 0, "packed512": 0}
    slots = dict.fromkeys(real, 0)
    for i in range(0, len(order) - 31, 32):
        part = order[i : i + 32]
        for name, kw in (("padded", {}), ("packed", {"packing": True}),
                         ("packed512", {"packing": True, "pack_tokens": 512})):
            nb = full.gather(part, **kw)
            real[name] += int(nb["attention_mask"].sum())
            slots[name] += int(nb["attention_mask"].size)
            assert nb["attention_mask"].size == batch_slots(full.lengths[part], **kw)
            assert nb["attention_mask"].shape == batch_shape(full.lengths[part], **kw)
    eff = {k: real[k] / slots[k] for k in real}
    assert eff["packed"] == 1.0 >= 0.99
    assert eff["padded"] < 0.5 < eff["packed512"] < 1.0


@pytest.mark.parametrize(("loss", "per_token"), [("token_cross_entropy", True),
                                                 ("cross_entropy", False)])
def test_flex_attention_gives_the_dense_masks_outputs(table, loss, per_token):
    """`attention=flex` (FlexAttention with a block mask from the segment ids) computes what the
    dense block-diagonal mask does, from the same parameters: the same outputs and loss for a
    packed batch (forward only: PyTorch has no FlexAttention backward on a CPU; the gradients
    are compared on a GPU by bench/gpu_check.py)."""
    positions = np.random.default_rng(4).permutation(len(table))[:24]
    packed = to_torch(table.gather(positions, max_length=128, packing=True, pack_tokens=160), CPU)
    torch.manual_seed(0)
    dense = SeqTransformer(vocab_size=64, num_outputs=4, per_token=per_token).eval()
    flex = SeqTransformer(vocab_size=64, num_outputs=4, per_token=per_token, attention="flex")
    flex.load_state_dict(dense.state_dict())  # the same parameter names: checkpoints carry over
    with torch.no_grad():
        want, got = dense(packed), flex.eval()(packed)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert loss_sum(got, packed, loss)[0].item() == pytest.approx(
            loss_sum(want, packed, loss)[0].item(), rel=1e-5)


def test_flex_attention_refuses_attention_dropout():
    with pytest.raises(ValueError, match="dropout"):
        SeqTransformer(vocab_size=8, num_outputs=2, dropout=0.1, attention="flex")
    with pytest.raises(ValueError, match="known: dense, flex"):
        SeqTransformer(vocab_size=8, num_outputs=2, attention="sparse")


def test_an_odd_model_width_gets_its_positions():
    """d_model=33 (nhead=3 divides it): the sinusoidal positions have one cosine column fewer
    than sines; the first forward used to fail on the shapes."""
    from pipeline.engine.models import sinusoidal_positions

    pe = sinusoidal_positions(5, 33, torch.device("cpu"))
    assert pe.shape == (5, 33)
    p, i = 3, 16  # the last column: PE(p, 2i) = sin(p / 10000^(2i/d)); PE(p, 2i+1) = cos(...)
    assert float(pe[p, 2 * i]) == pytest.approx(math.sin(p / 10000 ** (2 * i / 33)), abs=1e-6)
    assert float(pe[p, 2 * 15 + 1]) == pytest.approx(math.cos(p / 10000 ** (30 / 33)), abs=1e-6)
    model = SeqTransformer(vocab_size=10, num_outputs=3, d_model=33, nhead=3)
    out = model({"input_ids": torch.randint(0, 10, (2, 5)),
                 "attention_mask": torch.ones(2, 5, dtype=torch.bool)})
    assert out.shape == (2, 3)


def test_under_bf16_a_long_packed_sample_pools_as_its_padded_self():
    """CPU autocast leaves LayerNorm's output bf16: a pooled mean summed in bf16 stopped
    counting at 256 tokens (256 + 1 rounds to 256), and a packed 900-token sample's pooled
    features came out 3.5 times too large (logits off by 0.5, against 0.003 padded)."""
    rng = np.random.default_rng(0)
    lengths = [500, 3, 900, 40]
    tokens = [rng.integers(1, 64, n) for n in lengths]
    width = max(lengths)
    padded = {"input_ids": np.zeros((4, width), np.int64),
              "attention_mask": np.zeros((4, width), bool)}
    for i, t in enumerate(tokens):
        padded["input_ids"][i, :len(t)], padded["attention_mask"][i, :len(t)] = t, True
    row = np.concatenate(tokens)[None]
    packed = {"input_ids": row, "attention_mask": np.ones_like(row, bool),
              "segment_ids": np.repeat(np.arange(1, 5), lengths)[None],
              "position_ids": np.concatenate([np.arange(n) for n in lengths])[None]}
    torch.manual_seed(0)
    model = SeqTransformer(vocab_size=64, num_outputs=4).eval()
    with torch.no_grad():
        exact = model(to_torch(padded, CPU)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = {name: model(to_torch(b, CPU)).float() for name, b in
                   (("padded", padded), ("packed", packed))}
    for name, out in got.items():  # bf16's own rounding: about 0.01 here
        assert (out - exact).abs().max() < 0.05, name
