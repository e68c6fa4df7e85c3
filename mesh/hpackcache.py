"""HPACK encoder and decoder (hpack's) that reuse representations while the dynamic table is unchanged."""

from __future__ import annotations

from collections.abc import Iterable

import hpack
from hpack.hpack import INDEX_NEVER, _to_bytes, table_entry_size
from hpack.table import HeaderTable

# Fields whose value is new on (nearly) every request. Indexing them would add a table entry per request, which
# evicts the entries that make the other fields one byte each and changes the table, so nothing could be reused;
# they are sent as literals never indexed, without Huffman coding (36 bytes of a UUID are not worth the CPU).
UNIQUE_PER_REQUEST = frozenset(
    {
        b"x-request-id",
        b"traceparent",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"b3",
        b"x-mesh-deadline",
        b"grpc-timeout",
    }
)
_CACHE_ENTRIES = 512  # per connection and direction; cleared whole when full


class _Table(HeaderTable):
    """hpack's dynamic table with a generation number that changes whenever an index could change meaning."""

    def __init__(self) -> None:
        super().__init__()
        self.generation = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.generation += 1
        super().add(name, value)

    @HeaderTable.maxsize.setter  # type: ignore[attr-defined]
    def maxsize(self, newmax: int) -> None:
        # hpack forgets a pending resize when the same size is set again (SETTINGS repeating a value): the size
        # update would never be sent and the peer's table would disagree. A pending resize stays pending.
        pending = self.resized
        self.generation += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]
        self.resized = self.resized or pending


class Encoder(hpack.Encoder):
    """hpack.Encoder whose fully indexed fields are looked up once per table generation, not searched each time.

    The output is what hpack.Encoder would produce, except for UNIQUE_PER_REQUEST fields (see above)."""

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _Table()
        self._indexed: dict[tuple[bytes, bytes], bytes] = {}
        self._generation = 0

    def encode(self, headers: Iterable, huffman: bool = True) -> bytes:  # type: ignore[override]
        table = self.header_table
        if table.resized or isinstance(headers, dict):  # a size update leads the block: hpack's own path
            return super().encode(headers, huffman)
        parts: list[bytes] = []
        indexed = self._indexed
        for header in headers:
            sensitive = (isinstance(header, hpack.HeaderTuple) and not header.indexable) or (
                len(header) > 2 and bool(header[2])
            )
            field = (_to_bytes(header[0]), _to_bytes(header[1]))
            if table.generation != self._generation:
                indexed.clear()
                self._generation = table.generation
            if not sensitive:
                encoded = indexed.get(field)
                if encoded is not None:
                    parts.append(encoded)
                    continue
                if field[0] in UNIQUE_PER_REQUEST:  # RFC 7541 6.2.3, no Huffman coding
                    parts.append(self._encode_literal(field[0], field[1], INDEX_NEVER, huffman=False))
                    continue
            encoded = self.add(field, sensitive, huffman)
            parts.append(encoded)
            if not sensitive and encoded[0] & 0x80 and table.generation == self._generation:
                if len(indexed) >= _CACHE_ENTRIES:
                    indexed.clear()
                indexed[field] = encoded  # an indexed representation: valid until the table changes
        return b"".join(parts)


class Decoder(hpack.Decoder):
    """hpack.Decoder that keeps the fields of one-byte indexed representations for the current table generation.

    Literals, multi-byte indices and table size updates go through hpack's own code; the result, errors and the
    header list size limit are hpack's."""

    def __init__(self, max_header_list_size: int = hpack.hpack.DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        super().__init__(max_header_list_size)
        self.header_table = _Table()
        self._fields: dict[int, hpack.HeaderTuple] = {}
        self._generation = 0

    def decode(self, data: bytes, raw: bool = False) -> list:  # type: ignore[override]
        if not raw:
            return list(super().decode(data, raw))
        table = self.header_table
        fields = self._fields
        view = memoryview(data)
        headers: list[hpack.HeaderTuple] = []
        inflated = 0
        pos, end = 0, len(data)
        while pos < end:
            if table.generation != self._generation:
                fields.clear()
                self._generation = table.generation
            first = data[pos]
            if 0x80 < first < 0xFF:  # indexed field, index 1..126 in this byte
                header = fields.get(first)
                if header is None:
                    header = fields[first] = hpack.HeaderTuple(*table.get_by_index(first & 0x7F))
                consumed = 1
            elif first & 0x80:
                header, consumed = self._decode_indexed(view[pos:])
            elif first & 0x40:
                header, consumed = self._decode_literal_index(view[pos:])
            elif first & 0x20:
                if headers:
                    raise hpack.HPACKDecodingError("Table size update not at the start of the block")
                consumed = self._update_encoding_context(view[pos:])
                pos += consumed
                continue
            else:
                header, consumed = self._decode_literal_no_index(view[pos:])
            headers.append(header)
            inflated += table_entry_size(header[0], header[1])
            if inflated > self.max_header_list_size:
                raise hpack.OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received"
                )
            pos += consumed
        self._assert_valid_table_size()
        return headers
