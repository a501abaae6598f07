import json

import numpy as np
import pytest

from data_tools.preprocess import preprocess
from megatron_ast.data.blend import BlendSpec, default_blend
from megatron_ast.data.sampler import BlendedSampler
from megatron_ast.data.streams import load_domains
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError
from tests.conftest import stdlib_texts, write_jsonl


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, hf_tokenizer_dir):
    root = tmp_path_factory.mktemp("corpus")
    texts = stdlib_texts(40)
    write_jsonl(root / "book" / "a.jsonl", texts[:25])
    write_jsonl(root / "github" / "b.jsonl", texts[25:])
    out = root / "shards"
    preprocess([str(root / "book"), str(root / "github")], out, hf_tokenizer_dir)
    return out


def test_windows_tile_each_domain_stream(shard_dir):
    streams = load_domains([shard_dir], 64)
    s = streams["book"]
    flat = np.concatenate([sh.tokens for sh in s.shards]).astype(np.int64)
    got = np.concatenate([s.window(k) for k in range(s.num_windows)])
    np.testing.assert_array_equal(got, flat[: s.num_windows * 64])


def test_deterministic_and_exactly_resumable(shard_dir):
    a = BlendedSampler([shard_dir], 32, seed=7)
    first = a.next_batch(50)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (checkpoint client state)
    after = a.next_batch(300)  # crosses epoch boundaries of the smaller domain
    b = BlendedSampler([shard_dir], 32, seed=7)
    np.testing.assert_array_equal(b.next_batch(50), first)
    c = BlendedSampler([shard_dir], 32, seed=7)
    c.load_state_dict(state)
    np.testing.assert_array_equal(c.next_batch(300), after)
    assert not np.array_equal(BlendedSampler([shard_dir], 32, seed=8).next_batch(50), first)


def test_blend_proportions_are_exact_at_every_prefix(shard_dir):
    s = BlendedSampler([shard_dir], 32, blend=BlendSpec.of({"book": 3, "github": 1}))
    for n in range(1, 200):
        next(s)
        assert abs(s.drawn[s.domains.index("book")] - 0.75 * n) <= 1


def test_default_blend_is_redpajama_mix():
    assert default_blend(["book", "github"]).resolve(["book", "github"]) == {"book": 0.5, "github": 0.5}
    w = default_blend(["common_crawl", "c4"]).resolve(["common_crawl", "c4"])
    assert w["common_crawl"] == pytest.approx(67 / 82)
    with pytest.raises(UsageError, match="no default RedPajama weight"):
        default_blend(["poems"])


def test_unknown_blend_domain_and_bad_specs(shard_dir, tmp_path):
    with pytest.raises(UsageError, match="unknown blend domain"):
        BlendedSampler([shard_dir], 32, blend=BlendSpec.of({"arxiv": 1.0, "book": 1.0}))
    spec = tmp_path / "blend.yaml"
    spec.write_text("weights:\n  book: 2\n  github: 1\n")
    assert BlendSpec.load(spec).weights == {"book": 2.0, "github": 1.0}
    spec.write_text("weights:\n  book: -1\n")
    with pytest.raises(UsageError, match=">= 0"):
        BlendSpec.load(spec)


def test_refuses_shards_of_another_tokenizer(shard_dir, sp_model):
    with pytest.raises(UsageError, match="made with tokenizer"):
        BlendedSampler([shard_dir], 32, tokenizer=Tokenizer.load(sp_model).identity)


def test_state_of_another_run_is_refused(shard_dir):
    s = BlendedSampler([shard_dir], 32, seed=1)
    with pytest.raises(UsageError, match="seed"):
        BlendedSampler([shard_dir], 32, seed=2).load_state_dict(s.state_dict())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_the_tableless_permutation_is_a_bijection_that_depends_on_its_keys(n):
    from megatron_ast.data.sampler import permuted

    keys = [11, 22, 33, 44, 55, 66]
    order = [permuted(i, n, keys) for i in range(n)]
    assert sorted(order) == list(range(n))
    if n >= 16:
        other = [permuted(i, n, [k + 1 for k in keys]) for i in range(n)]
        assert other != order and order != list(range(n))
        # shuffled, not shifted: few entries keep a neighbour's order (about half for a random permutation)
        assert 0.3 < np.mean(np.diff(order) > 0) < 0.7


def test_a_rank_reads_only_its_rows_and_the_position_moves_by_the_whole_batch(shard_dir):
    whole = BlendedSampler([shard_dir], 32, seed=3)
    mine = BlendedSampler([shard_dir], 32, seed=3)
    rows = [1, 4, 5]
    np.testing.assert_array_equal(mine.next_batch(8, rows), whole.next_batch(8)[rows])
    assert mine.state_dict() == whole.state_dict()
    np.testing.assert_array_equal(mine.next_batch(8), whole.next_batch(8))


def test_a_state_from_the_stored_permutation_era_is_refused(shard_dir):
    s = BlendedSampler([shard_dir], 32, seed=7)
    old = {k: v for k, v in s.state_dict().items() if k != "order"}
    with pytest.raises(UsageError, match="stored permutation"):
        s.load_state_dict(old)
