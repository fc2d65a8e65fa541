import pytest
import torch

from llmbin.packing.positions import BITMAP, NIBBLE_GAP, decode_positions, encode_positions


def _random_mask(shape, density, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (13, 65), (64, 576), (5, 1536)])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.1, 0.3, 1.0])
def test_positions_round_trip(shape, density):
    mask = _random_mask(shape, density, shape[1])
    encoding, stream = encode_positions(mask)
    positions = decode_positions(encoding, stream, shape)
    assert torch.equal(positions, torch.nonzero(mask.flatten()).flatten())


def test_long_gaps_and_both_ends():
    mask = torch.zeros(4, 100, dtype=torch.bool)
    mask[0, 0] = mask[3, 99] = mask[2, 15] = mask[2, 30] = True
    encoding, stream = encode_positions(mask)
    assert encoding == NIBBLE_GAP
    assert torch.equal(decode_positions(encoding, stream, mask.shape), torch.nonzero(mask.flatten()).flatten())


def test_sparse_masks_use_gaps_and_dense_masks_use_a_bitmap():
    assert encode_positions(_random_mask((64, 512), 0.1, 0))[0] == NIBBLE_GAP
    assert encode_positions(_random_mask((64, 512), 0.5, 0))[0] == BITMAP


def test_ten_percent_costs_about_half_a_bit_per_weight():
    mask = _random_mask((256, 1024), 0.1, 0)
    _, stream = encode_positions(mask)
    bits_per_weight = stream.numel() * 8 / mask.numel()
    assert 0.45 < bits_per_weight < 0.56


def test_unknown_encoding_is_rejected():
    with pytest.raises(ValueError, match="unknown position encoding"):
        decode_positions("huffman", torch.zeros(1, dtype=torch.uint8), (1, 1))
