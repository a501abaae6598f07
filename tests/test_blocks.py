import torch

from megatron_ast.blocks import CPU_BLOCK, blocks


def test_blocks_cover_the_range_once_and_are_whole_off_cpu():
    n = 2 * CPU_BLOCK + 5
    covered = torch.cat([torch.arange(n)[sl] for sl in blocks(n, torch.device("cpu"))])
    assert torch.equal(covered, torch.arange(n)) and len(list(blocks(n, torch.device("cpu")))) == 3
    assert list(blocks(n, torch.device("meta"))) == [slice(0, n)] and list(blocks(0, torch.device("cpu"))) == []
