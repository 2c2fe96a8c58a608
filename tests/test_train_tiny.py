"""The copy batches that teach the bundled attention-only model to copy hold what their
docstring promises: BOS, a sequence, a gap, the sequence again at the end, one alphabet per row."""

import pytest
import torch

from conftest import load_script


@pytest.fixture(scope="module")
def train_tiny():
    return load_script("train_tiny")


def copied_length(row: torch.Tensor) -> int:
    """The longest n such that the row's last n tokens occur earlier in the row (after BOS)."""
    best = 0
    for n in range(1, (len(row) - 1) // 2 + 1):
        tail = row[-n:]
        if any(torch.equal(row[s:s + n], tail) for s in range(1, len(row) - 2 * n + 1)):
            best = n
    return best


@pytest.mark.parametrize("alphabet", [20, None])
def test_copy_batch_rows_end_with_a_copy_from_their_own_alphabet(train_tiny, alphabet):
    pool = torch.arange(1000, 1200)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        rows = train_tiny.copy_batch(pool, (10, 60), 2600, 256, 50256, gen, alphabet)
        n, T = rows.shape
        assert 4 <= n <= 32 and T <= 256
        assert (rows[:, 0] == 50256).all()
        assert torch.isin(rows[:, 1:], pool).all()
        # the copy's length is the same for the whole batch and fixes the row length to 1 + 2L + gap
        lengths = {copied_length(r) for r in rows[:3]}
        L = min(lengths)
        assert 10 <= L and 2 * L + 1 <= T <= 3 * L + 1
        size = alphabet or max(20, L)
        for r in rows:
            assert len(r[1:].unique()) <= size
        # rows do not share one alphabet
        assert len(torch.unique(rows[:, 1:])) > size


def test_copy_batch_alphabet_grows_with_the_sequence(train_tiny):
    pool = torch.arange(1000, 1200)
    gen = torch.Generator().manual_seed(1)
    rows = train_tiny.copy_batch(pool, (100, 100), 4000, 256, 50256, gen, None)
    distinct = torch.tensor([len(r[1:].unique()) for r in rows], dtype=torch.float)
    assert distinct.max() <= 100 and distinct.mean() > 40  # ~100 draws with repeats from 100 ids
    small = train_tiny.copy_batch(pool, (100, 100), 4000, 256, 50256, gen, 20)
    assert max(len(r[1:].unique()) for r in small) <= 20


def longest_repeat(row: torch.Tensor) -> tuple[int, int, int]:
    """(start of the first occurrence, start of the second, length) of the longest span that
    occurs twice in the row."""
    best = (0, 0, 0)
    for d in range(1, len(row)):
        same = torch.cat([(row[d:] == row[:-d]).int(), torch.zeros(1, dtype=torch.int)])
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int), same]))
        starts, ends = (edges == 1).nonzero().squeeze(-1), (edges == -1).nonzero().squeeze(-1)
        if len(starts):
            k = int((ends - starts).argmax())
            if int(ends[k] - starts[k]) > best[2]:
                best = (int(starts[k]), int(starts[k]) + d, int(ends[k] - starts[k]))
    return best


def test_copy_batch_anywhere_places_the_task_at_random_offsets(train_tiny):
    pool = torch.arange(1000, 1200)
    gen = torch.Generator().manual_seed(2)
    firsts = []
    for _ in range(3):
        rows = train_tiny.copy_batch(pool, (10, 30), 2600, 256, 50256, gen, 20, anywhere=True)
        assert rows.shape[1] == 256 and (rows[:, 0] == 50256).all()
        assert torch.isin(rows[:, 1:], pool).all()
        for r in rows[:8]:
            i, j, L = longest_repeat(r)
            # x (10-30 tokens; a chance match can lengthen the run by a token) and its copy after a
            # gap of at most len(x)
            assert 10 <= L <= 32 and 10 <= j - i <= 60
            firsts.append(i)
            # the filler around the task never uses the row's alphabet (the copied tokens)
            x = r[i:i + L]
            assert not torch.isin(r[1:max(1, i - L)], x).any() and not torch.isin(r[j + L:], x).any()
    assert min(firsts) < 60 and max(firsts) > 120  # the task sits anywhere in the context


def test_fresh_positions_reinitialises_only_the_late_rows_and_their_optimiser_state(train_tiny):
    import lens
    model = lens.HookedGPT(lens.GPTConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=32,
                                          d_vocab=50, attn_only=True))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randint(0, 50, (2, 32)), return_type="loss").backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_tiny.fresh_positions(model, opt, 20, seed=0)
    W = model.pos_embed.W_pos
    assert torch.equal(W[:20], before["pos_embed.W_pos"][:20])
    assert not torch.isclose(W[20:], before["pos_embed.W_pos"][20:]).any()
    assert abs(float(W[20:].std()) - 0.02) < 0.005  # the init's scale, not the trained one
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n != "pos_embed.W_pos")
    state = opt.state[W]
    assert (state["exp_avg"][20:] == 0).all() and (state["exp_avg_sq"][20:] == 0).all()
    assert (state["exp_avg_sq"][:20] > 0).any()


def test_fresh_pos_outside_the_context_is_refused_before_any_work(train_tiny, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.argv", ["train_tiny.py", "--model", "attn2l", "--out", str(tmp_path / "run"),
                                     "--fresh-pos", "256", "--cache-dir", str(tmp_path / "corpus")])
    with pytest.raises(SystemExit):
        train_tiny.main()
    assert "--fresh-pos 256: must be a position in [0, 256)" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "run").exists()
