import numpy as np
import pytest

from megatron_ast.data.indexed import IndexedShard, ShardWriter, bin_path, idx_path, token_dtype


def _docs(rng, n, vocab=1000):
    return [rng.integers(0, vocab, size=rng.integers(1, 50)) for _ in range(n)]


def test_roundtrip_and_megatron_core_reads_it(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = _docs(np.random.default_rng(0), 37)
    with ShardWriter(tmp_path / "s", np.uint16) as w:
        w.add_documents(np.concatenate(docs[:20]), [len(d) for d in docs[:20]])
        w.add_documents(np.concatenate(docs[20:]), [len(d) for d in docs[20:]])
        info = w.commit()
    assert info["documents"] == 37 and info["tokens"] == sum(map(len, docs))
    ours = IndexedShard(tmp_path / "s")
    theirs = IndexedDataset(str(tmp_path / "s"))
    assert ours.num_documents == len(theirs) == 37
    assert list(theirs.document_indices) == list(range(38))
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ours.document(i), d)
        np.testing.assert_array_equal(theirs[i], d)
        assert theirs[i].dtype == np.uint16


def test_reads_what_megatron_core_writes_including_multi_sequence_documents(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(bin_path(tmp_path / "m")), dtype=np.int32)
    b.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    b.add_document(torch.tensor([7, 8]), [2])
    b.finalize(str(idx_path(tmp_path / "m")))
    s = IndexedShard(tmp_path / "m")
    assert s.dtype == np.int32 and s.num_documents == 2
    np.testing.assert_array_equal(s.document(0), [1, 2, 3, 4, 5])
    # add_shard keeps the sequence/document structure (Megatron's add_index)
    with ShardWriter(tmp_path / "m2", np.int32) as w:
        w.add_shard(s)
        w.add_documents(np.array([9, 9, 9]), [3])
        w.commit()
    s2 = IndexedShard(tmp_path / "m2")
    assert list(s2.document_indices) == [0, 2, 3, 4]
    np.testing.assert_array_equal(s2.document(2), [9, 9, 9])


def test_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "s", np.uint16) as w:
            w.add_documents(np.arange(10), [10])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_token_dtype_follows_vocab_size():
    assert token_dtype(49152) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32
