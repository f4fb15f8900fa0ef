import torch

from compress.methods.sparsity import prune_mask


def test_nm_groups_keep_at_most_n():
    scores = torch.rand(64, 96, generator=torch.Generator().manual_seed(0))
    for n, m in ((2, 4), (4, 8), (1, 4), (3, 8)):
        mask = prune_mask(scores, (m - n) / m, f"{n}:{m}")
        kept = mask.view(64, 96 // m, m).sum(-1)
        assert (kept == n).all()


def test_nm_respects_earlier_zeros():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(32, 64, generator=generator)
    previous = torch.rand(32, 64, generator=generator) > 0.7  # ~70% already pruned
    mask = prune_mask(scores, 0.5, "2:4", previous)
    assert (mask.view(32, 16, 4).sum(-1) <= 2).all()
    assert not (mask & ~previous).any()  # nothing pruned comes back


def test_unstructured_row_prunes_exact_count_per_row():
    scores = torch.rand(16, 100, generator=torch.Generator().manual_seed(2))
    mask = prune_mask(scores, 0.3, "unstructured", scope="row")
    assert ((~mask).sum(1) == 30).all()
    # the pruned ones are the lowest of each row
    assert (scores[~mask].view(16, 30).max(1).values <= scores[mask].view(16, 70).min(1).values).all()


def test_unstructured_layer_prunes_lowest_of_whole_layer():
    scores = torch.rand(16, 100, generator=torch.Generator().manual_seed(3))
    mask = prune_mask(scores, 0.6, "unstructured", scope="layer")
    assert (~mask).sum() == 960
    assert scores[~mask].max() <= scores[mask].min()
