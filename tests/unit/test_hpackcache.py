"""The caching HPACK coder against hpack's own: same header lists across many blocks, sizes and table changes."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh import hpackcache

NAMES = [b":status", b"content-type", b"date", b"x-request-id", b"server", b"x-custom", b"cookie", b"authorization"]
VALUES = [b"200", b"text/plain", b"a", b"b" * 40, b"", b"Thu, 03 Dec 2026 07:30:00 GMT", b"\xff\x00binary"]
field = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES) | st.binary(max_size=60))
block = st.lists(field, max_size=12)
step = st.one_of(block, st.sampled_from([0, 64, 256, 4096]))  # a header list, or a new header table size


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=25))
def test_encoder_output_decodes_to_the_same_headers_as_hpacks(steps: list) -> None:
    ours, reference = hpackcache.Encoder(), hpack.Decoder()
    for item in steps:
        if isinstance(item, int):
            ours.header_table_size = item
            continue
        decoded = reference.decode(ours.encode(item), raw=True)
        assert [tuple(h) for h in decoded] == item


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=25))
def test_decoder_reads_hpacks_blocks_as_hpack_does(steps: list) -> None:
    encoder, ours, reference = hpack.Encoder(), hpackcache.Decoder(), hpack.Decoder()
    for item in steps:
        if isinstance(item, int):
            if item != encoder.header_table_size:  # hpack forgets a pending resize set twice (see _Table)
                encoder.header_table_size = item
            continue
        data = encoder.encode(item)
        assert ours.decode(data, raw=True) == reference.decode(data, raw=True)
        assert ours.header_table.dynamic_entries == reference.header_table.dynamic_entries


def test_repeated_blocks_are_one_byte_per_field_and_ids_stay_out_of_the_table() -> None:
    encoder, decoder = hpackcache.Encoder(), hpackcache.Decoder()
    head = [(b":method", b"GET"), (b":path", b"/"), (b"user-agent", b"curl")]
    first = encoder.encode([*head, (b"x-request-id", b"1" * 36)])
    second = encoder.encode([*head, (b"x-request-id", b"2" * 36)])
    assert len(second) < len(first)  # user-agent is indexed now
    assert second[:3] == bytes([0x82, 0x84, 0xBE])  # :method GET, :path /, the first dynamic entry
    assert len(encoder.header_table.dynamic_entries) == 1  # the ids were never added
    decoder.decode(first, raw=True)
    assert decoder.decode(second, raw=True)[-1] == (b"x-request-id", b"2" * 36)
    assert isinstance(decoder.decode(second, raw=True)[-1], hpack.NeverIndexedHeaderTuple)


def test_decoder_keeps_hpacks_errors_and_limits() -> None:
    decoder = hpackcache.Decoder(max_header_list_size=100)
    with pytest.raises(hpack.InvalidTableIndexError):
        decoder.decode(bytes([0x80 | 70]), raw=True)  # no dynamic entry 70
    with pytest.raises(hpack.HPACKDecodingError, match="Table size update"):
        decoder.decode(bytes([0x82, 0x20]), raw=True)
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(bytes([0x82]) * 5, raw=True)  # 5 x (7 + 3 + 32) > 100


def test_a_table_size_set_twice_is_still_announced() -> None:
    encoder, decoder = hpackcache.Encoder(), hpack.Decoder()
    encoder.header_table_size = 0
    decoder.decode(encoder.encode([]), raw=True)
    encoder.header_table_size = 64
    encoder.header_table_size = 64  # hpack's own Encoder drops the pending update here
    fields = [(b"content-type", b"200"), (b"content-type", b"200")]
    assert decoder.decode(encoder.encode(fields), raw=True) == fields
