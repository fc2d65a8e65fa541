import pytest
import torch

from llmbin.packing.bitpack import pack_bits, pack_codes, packed_row_bytes, unpack_bits, unpack_codes


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 64), (2, 65), (7, 200), (1, 4097), (2, 3, 13)])
def test_pack_unpack_bits_round_trip(shape):
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], packed_row_bytes(shape[-1]))
    assert packed.shape[-1] % 8 == 0  # rows aligned to 64 bits
    assert torch.equal(unpack_bits(packed, shape[-1]), bits)


def test_bit_order_is_lsb_first_along_the_input_dimension():
    bits = torch.zeros(1, 16, dtype=torch.bool)
    bits[0, 0] = bits[0, 9] = True  # element 0 -> byte 0 bit 0; element 9 -> byte 1 bit 1
    packed = pack_bits(bits)
    assert packed[0, 0].item() == 0b00000001
    assert packed[0, 1].item() == 0b00000010
    assert packed[0, 2:].sum().item() == 0  # padding bits are zero


def test_packed_row_reads_as_little_endian_words():
    bits = torch.rand(4, 128, generator=torch.Generator().manual_seed(1)) > 0.5
    words = pack_bits(bits).view(torch.int64)
    for row in range(4):
        for k in range(128):
            assert bool((words[row, k // 64] >> (k % 64)) & 1) == bool(bits[row, k])


@pytest.mark.parametrize("nbits,count", [(1, 1), (3, 17), (7, 1000), (8, 9)])
def test_codes_round_trip(nbits, count):
    codes = torch.randint(0, 1 << nbits, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_codes(codes, nbits)
    assert packed.shape == (nbits, -(-count // 8))
    assert torch.equal(unpack_codes(packed, count), codes)


def test_codes_that_do_not_fit_are_rejected():
    with pytest.raises(ValueError, match="do not fit in 3 bits"):
        pack_codes(torch.tensor([8]), 3)


def test_unpack_rejects_too_short_input():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, 8, dtype=torch.uint8), 65)
