"""Data-parallel packing by cost (no process group): cost_balanced_split evens out both token counts and attention
work (n^2 per video) over 8 groups on the demo training stream, where dealing by tokens alone does not."""
import pytest

from vdit.demo.cli import train
from vdit.demo.data import ShapesDataset
from vdit.distributed.sharding import balanced_split, cost_balanced_split


def _stream(batches: int, budget: int):
    """Token counts of the demo's packed batches (the default training flags, a budget of ``budget`` tokens)."""
    args = train.parse_args(["--out", "unused"])
    dataset = ShapesDataset(seed=args.seed, **train.dataset_sizes(args))
    patch = tuple(int(p) for p in args.patch_size.split("x"))
    index = 0
    for _ in range(batches):
        counts = []
        while True:
            spec, _ = dataset.spec(index)
            n = (spec.frames // patch[0]) * (spec.height // patch[1]) * (spec.width // patch[2])
            if counts and sum(counts) + n > budget:
                break
            counts.append(n)
            index += 1
        yield counts


def _max_over_mean(counts, split, cost):
    loads = [sum(cost(counts[i]) for i in part) for part in split]
    return max(loads) / (sum(loads) / len(loads))


def test_cost_balanced_split_evens_tokens_and_attention_work():
    for counts in _stream(10, 8 * 2048):  # 8 groups, each the default budget of 2048 tokens
        split = cost_balanced_split(counts, 8)
        assert sorted(i for part in split for i in part) == list(range(len(counts)))
        assert all(part == sorted(part) for part in split) and split == cost_balanced_split(counts, 8)
        assert _max_over_mean(counts, split, lambda n: n) <= 1.1
        assert _max_over_mean(counts, split, lambda n: n * n) <= 1.1
    # dealing by tokens alone leaves some batch's attention work far from even
    worst = max(_max_over_mean(c, balanced_split(c, 8), lambda n: n * n) for c in _stream(10, 8 * 2048))
    assert worst > 1.2


def test_cost_balanced_split_edges():
    assert cost_balanced_split([], 2) == [[], []]
    assert all(cost_balanced_split([5, 5, 5], 3))
    assert sorted(sum(cost_balanced_split([0, 0], 2, a=0.0, b=0.0), [])) == [0, 1]  # nothing to balance
    with pytest.raises(ValueError, match="parts must be"):
        cost_balanced_split([1], 0)
