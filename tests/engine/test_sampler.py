"""The resumable sampler: deterministic order, exact skip, DDP shards that tile the batch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lightnets.engine.sampler import ResumableSampler


def test_same_epoch_same_order_other_epoch_other_order():
    a = ResumableSampler(100, seed=3)
    b = ResumableSampler(100, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    assert sorted(a) == list(range(100))
    b.set_epoch(3)
    assert list(a) != list(b)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), start=st.integers(0, 200), epoch=st.integers(0, 5))
def test_skip_is_a_suffix(n, start, epoch):
    full = ResumableSampler(n, seed=1)
    full.set_epoch(epoch)
    skipped = ResumableSampler(n, seed=1)
    skipped.set_epoch(epoch, start=start)
    assert list(skipped) == list(full)[start:]
    assert len(skipped) == max(0, n - start)


@settings(max_examples=40, deadline=None)
@given(world=st.integers(2, 4), per_rank=st.integers(1, 8), batches=st.integers(1, 6))
def test_rank_batches_tile_the_single_process_batch(world, per_rank, batches):
    n = world * per_rank * batches
    single = ResumableSampler(n, seed=7)
    single.set_epoch(1)
    order = list(single)
    shards = []
    for r in range(world):
        s = ResumableSampler(n, seed=7, rank=r, world_size=world)
        s.set_epoch(1)
        shards.append(list(s))
    for i in range(batches):
        union = sorted(x for shard in shards for x in shard[i * per_rank : (i + 1) * per_rank])
        expected = sorted(order[i * world * per_rank : (i + 1) * world * per_rank])
        assert union == expected


def test_eval_shards_without_padding_cover_each_sample_once():
    shards = []
    for r in range(3):
        s = ResumableSampler(10, shuffle=False, rank=r, world_size=3, pad=False)
        shards += list(s)
    assert sorted(shards) == list(range(10))
