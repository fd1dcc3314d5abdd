"""
Per-peer token buckets that cap how much store work a remote peer may ask for (flood protection, sans-IO).

The unit is one *item*: what storing one small item costs (some 10 us of the event loop). Bytes cost too, weighed by
what decoding them costs: one item per STORE_BYTES_PER_ITEM bytes, and STRUCTURE_BYTE_WEIGHT (EXT_BYTE_WEIGHT) times
more for each byte that may start an array or a map (an ext type, such as a tuple), plus a little for a text string's
start (a map key is interned) and for every other byte (a list element, however short), in documents that do not start
with a scalar: those are decoded by Python code, a walk step or a call each (1 to 15 us, a thousand times a plain
byte), and 4 MiB of nested tuples used to take seconds to decode. A long document is walked object by object (in a
bounded number of steps) so that the bytes of its binary and text strings, and of its arrays of floats (checked at C
speed, each byte weighed FLOAT_RUN_BYTE_WEIGHT more), count as payload, whatever they look like, and those of runs of
ints in an array as plain scalars (MIXED_RUN_BYTE_WEIGHT more if of mixed widths). A byte that may be an int decoding
to a new Python object weighs NEW_INT_BYTE_WEIGHT more, unless it is known to be in a run of ints of one width (other
than int 8).
"""

import functools
import re
import time
from typing import Callable, Dict, Hashable, Optional, Tuple

import msgpack
import numpy as np

from hivemind.utils.serializer import MSGPackSerializer

DEFAULT_BURST_ITEMS = 20000  # a new peer receiving replicas may get thousands of items in one request
DEFAULT_ITEMS_PER_SECOND = 2000.0
# a peer whose allowance is whole (or half of it, see LENDING_SHARE) may send one request of few items that costs
# more than it, up to this many items, and is then in debt (it waits for its allowance to refill past what it
# borrowed): an honest value decoding to tens of thousands of objects (45 000 tuples of two floats: 55 000 items,
# 0.12 s to decode) is stored, as by 1.1.12, while the costliest value found per item (a list of ({}, {}, {}):
# 59 400 items took 0.32 s of CPU to store) takes at most ~0.35 s of the event loop, and the average rate stays the
# same (docs/security.md)
DEFAULT_MAX_REQUEST_ITEMS = 3 * DEFAULT_BURST_ITEMS
# a peer may borrow once at least this share of its allowance is back, not only when it is whole: a sender without
# our pacing (1.1.12) that stored 1 000 small items had its large value refused 40 ms later (19 000 of 20 000 left)
# where 1.1.12 replicas store it; a borrowing peer still pays back all it borrowed at the same average rate, and may
# spend at most half a burst more in a short while (~0.1 s of CPU)
LENDING_SHARE = 0.5
MAX_BORROWING_REQUEST_ITEMS = 16  # store items in a request that may borrow (a store of one key's values)
# the whole dictionaries of a request that borrowed (a handover of a few keys to a new peer, as 1.1.12 sends them) are
# charged after it, and may borrow this much more: storing an entry takes ~13 us of CPU while charged about one item,
# so 15 dictionaries of 2 500 entries borrowing up to the cap (24 000 items) took 0.38 s; now at most ~30 ms more
DICTIONARY_LOAN_ITEMS = 2000
# a whole dictionary sent to be stored costs one item per entry it declares, plus decoding its subkeys and entry
# values (charged before they are decoded: a peer out of tokens gets nothing decoded)
# a whole dictionary's subkeys are taken as received (for validators and the dictionary's size) unless some entry was
# dropped on decoding; then they are encoded again, which costs about twice their decoding
REENCODING_COST_FACTOR = 2
STORE_BYTES_PER_ITEM = 2048
STRUCTURE_BYTE_WEIGHT = 256  # a byte that may start an array or a map: about 1 us to walk, once nested
EXT_BYTE_WEIGHT = 1024  # a byte that may start an ext type: a Python call, and another decoder for registered types
# a byte that may start a text string: as a map's key, each string is hashed and interned (~0.4 us per entry, so a
# 4 MiB map of short string keys took 0.22 s while charged 2 000 items, ~100 us each)
STR_BYTE_WEIGHT = 32
# every byte of a document that does not start with a scalar, beyond its own weight, unless a walk finds it inside a
# binary or text string or a run of floats: an element of an array costs ~20 ns to decode however short (1 MB of
# single-byte ints took 25 ms while charged 512 items, so a fresh peer's burst of them took 1.05 s)
SCALAR_BYTE_WEIGHT = 3
# a byte of a run of floats in an array, beyond its own weight: each float becomes a Python float (float32 ones
# converted), ~12 ns per byte in a whole store request, so at one item per 2048 bytes a fresh peer's burst of 1 MB
# float lists took 0.57 s (float64) and 0.71 s (float32) of CPU, ~26 us per item; now 0.14-0.16 s, ~8 us per item
FLOAT_RUN_BYTE_WEIGHT = 2
# a byte that may be a negative fixint below -5 (each decodes to a new Python int: CPython keeps -5..256 ready) or
# start an int of 1 to 8 more bytes, beyond its own weight: 35-55 ns each, and up to ~40 ns per byte when mixed with
# other one-byte scalars or ints (a mispredicted branch each), so 1 MB of fixints -32..-6 in one array took 33-35 ms
# while charged 1 953 items (~17 us per item, a fresh peer's burst of them 0.58 s of CPU); now ~4 us per item
NEW_INT_BYTE_WEIGHT = 12
# a byte of a run of ints of mixed widths among an array's elements (token ids of a vocabulary above 65 536 mix 16
# and 32 bit ints), beyond its own weight: up to ~37 ns per byte (1 and 2 byte ints mixed, a mispredicted branch
# each) where a run of one width takes 6-19
MIXED_RUN_BYTE_WEIGHT = 4
_PAYLOAD_HEADS = frozenset(range(0xA0, 0xC0)) | {0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB}  # str and bin: skipped at C speed
_CONTAINER_BYTES = bytes(range(0x80, 0xA0)) + bytes((0xDC, 0xDD, 0xDE, 0xDF))  # fixmap, fixarray, array/map 16/32
_EXT_BYTES = bytes((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))  # ext 8/16/32, fixext 1..16
_ARRAY_HEADS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MAP_HEADS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_EXT_HEADER_LENGTHS = {0xC7: 3, 0xC8: 4, 0xC9: 6, 0xD4: 2, 0xD5: 2, 0xD6: 2, 0xD7: 2, 0xD8: 2}  # type code included
# an ext type registered with MSGPackSerializer (not the tuple) is decoded by its class's unpackb, Python code that
# checks each field: an empty DictionaryDHTValue (6 bytes) takes ~16 us, so a value of 74 000 of them, weighed 58 700
# items as any ext, took 0.8-1.2 s to check (more than three times the costliest borrowed request otherwise); each
# costs this much more (an upper bound counts each byte that may be the type code of a registered ext)
REGISTERED_EXT_WEIGHT = 3 * STORE_BYTES_PER_ITEM
# a tuple at the top of a document (a value or subkey such as (peer, step)) and the array that holds its items weigh
# this much together instead of an ext byte's and an array's (1 280): it is one Python call, ~2 us more than storing
# an int (~9-11 us per item in all), and was charged 0.64 items more, so storing 20 000 keys of small tuples was paced
# over ~12 s instead of ~3 s; only one per document, so a fresh peer's burst of the smallest costs no more CPU than
# one of ints (~0.2 s); the tuples inside it and what it holds are weighed as before (see store_item_cost for a
# whole dictionary's entries)
TOP_LEVEL_TUPLE_WEIGHT = 410
_FIXEXT_FIRST, _FIXEXT_LAST = 0xD4, 0xD8  # fixext 1..16: the type code follows the head
_EXT_TYPE_OFFSETS = ((2, 0xC7), (3, 0xC8), (5, 0xC9))  # ext 8/16/32: the type code follows the head and length
_EXT_HEAD = re.compile(rb"[\xc7-\xc9\xd4-\xd8]")
_FEW_EXT_BYTES = 16  # a document with up to this many is checked byte by byte, one with more by numpy passes
# a document of WALK_MIN_BYTES or more whose bytes may hold structure is walked object by object (~0.3 us each), at
# most one object per WALK_BYTES_PER_STEP bytes (plus 4), so that a binary string inside a list, a tuple or a map is
# charged as the payload it is (one per 512 bytes gave up on a list of 8 000 binary strings of 500 bytes, 1 ms to
# decode, and charged its random bytes as structure: 149 000 items, refused by every replica): weighing a 4 MiB
# request takes at most ~40 ms of CPU (docs/security.md)
WALK_MIN_BYTES = 4096
WALK_BYTES_PER_STEP = 128
_NOT_CONTAINER_BYTES = bytes(byte for byte in range(256) if byte not in _CONTAINER_BYTES)
_NOT_EXT_BYTES = bytes(byte for byte in range(256) if byte not in _EXT_BYTES)
_STR_BYTES = bytes(range(0xA0, 0xC0)) + bytes((0xD9, 0xDA, 0xDB))  # fixstr, str 8/16/32
_NOT_STR_BYTES = bytes(byte for byte in range(256) if byte not in _STR_BYTES)
_NEW_FIXINT_BYTES = bytes(range(0xE0, 0xFB))  # -32..-6
# in a run of ints, these and int 8 heads (-128..-33 as msgpack packs them, two bytes each: a run of one width of them
# took ~37 ns per element while charged 8, 9.6 us per item, and a fresh peer's burst of them 0.4 s of CPU)
_RUN_NEW_INT_BYTES = _NEW_FIXINT_BYTES + b"\xd0"
_NOT_RUN_NEW_INT_BYTES = bytes(byte for byte in range(256) if byte not in _RUN_NEW_INT_BYTES)
_NEW_INT_BYTES = _NEW_FIXINT_BYTES + bytes(range(0xCC, 0xD4))  # and uint/int 8, 16, 32, 64
_NOT_NEW_INT_BYTES = bytes(byte for byte in range(256) if byte not in _NEW_INT_BYTES)
_BYTE_WEIGHTS = np.array(
    [
        SCALAR_BYTE_WEIGHT
        + STRUCTURE_BYTE_WEIGHT * (byte in _CONTAINER_BYTES)
        + EXT_BYTE_WEIGHT * (byte in _EXT_BYTES)
        + STR_BYTE_WEIGHT * (byte in _STR_BYTES)
        + NEW_INT_BYTE_WEIGHT * (byte in _NEW_INT_BYTES)
        for byte in range(256)
    ],
    dtype=np.int64,
)
_FLOAT_STRIDES = {0xCA: 5, 0xCB: 9}  # float 32, float 64: head and payload
# ints (head and payload), and the scalars of one byte (fixints, nil, bools): a run of eight or more with the same
# head among an array's elements (token ids) decodes at C speed, and is checked and skipped in one walk step at C
# speed, its bytes weighed as scalars' (an int's payload may look like structure: 1 000 000 token ids cost 64 000
# items, 38 ms to decode; now 5 800, ~6 us per item as other values)
_INT_STRIDES = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}
_ONE_BYTE_SCALARS = bytes(range(0x00, 0x80)) + bytes(range(0xE0, 0x100)) + b"\xc0\xc2\xc3"
_ONE_BYTE_HEADS = frozenset(_ONE_BYTE_SCALARS)
_ONE_BYTE_RUN = re.compile(rb"[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]*")
_RUN_HEADS = _ONE_BYTE_HEADS | frozenset(_INT_STRIDES)
_MIN_RUN = 8
# a run of ints of mixed widths is checked in the document with every byte that cannot start an int or a one-byte
# scalar made invalid (0xc1), so that msgpack's skip (C speed, ~5 ns per element, no object made) fails at the first
# element that is neither, whatever an int's payload holds; a short one by a regular expression (an Unpacker alone
# takes ~2 us); a check counts as this many more walk steps (1-3 us)
_INT_HEADS_ONLY = bytes(byte if byte in _RUN_HEADS else 0xC1 for byte in range(256))
_FEW_MIXED = 32
_MIXED_CHECK_STEPS = 4
_INT_OR_ONE_BYTE_SCALAR = (
    rb"(?:[\x00-\x7f\xc0\xc2\xc3\xe0-\xff]|[\xcc\xd0].|[\xcd\xd1].{2}|[\xce\xd2].{4}|[\xcf\xd3].{8})"
)
# a document that starts with a scalar (nil, bool, int, float, str, bin) holds nothing else: its bytes are payload
_SCALAR_STARTS = frozenset(byte for byte in range(256) if byte not in _CONTAINER_BYTES + _EXT_BYTES)


def _structure_weight(data) -> int:
    """The weight of the bytes of ``data`` that may start an array, a map, an ext type or a text string, and of every
    byte as a scalar's (an upper bound)."""
    if len(data) >= WALK_MIN_BYTES:  # one pass counting each byte value: ~8 ms per 4 MiB, a third of three translates
        counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
        weight, num_ext_bytes = int(counts.dot(_BYTE_WEIGHTS)), int(counts[_FIXEXT_FIRST : _FIXEXT_LAST + 1].sum())
        num_ext_bytes += int(counts[[head for _, head in _EXT_TYPE_OFFSETS]].sum())
    else:
        num_ext_bytes = len(data.translate(None, _NOT_EXT_BYTES))
        weight = (
            STRUCTURE_BYTE_WEIGHT * len(data.translate(None, _NOT_CONTAINER_BYTES))
            + EXT_BYTE_WEIGHT * num_ext_bytes
            + STR_BYTE_WEIGHT * len(data.translate(None, _NOT_STR_BYTES))
            + NEW_INT_BYTE_WEIGHT * len(data.translate(None, _NOT_NEW_INT_BYTES))
            + SCALAR_BYTE_WEIGHT * len(data)
        )
    return weight + (REGISTERED_EXT_WEIGHT * _registered_ext_heads(data, num_ext_bytes) if num_ext_bytes else 0)


def _registered_ext_heads(data, num_ext_bytes: int) -> int:
    """How many of the ``num_ext_bytes`` bytes of ``data`` that may start an ext type have a type code registered
    with MSGPackSerializer where an ext's type code would be: a few (a tuple's header) are looked at one by one, more
    by a few passes at C speed (~3 ms per 4 MiB, ~10 us for a short document, which then costs 8 items or more)."""
    codes = [code for code in MSGPackSerializer.registered_type_codes() if code in data]
    if not codes:
        return 0
    if num_ext_bytes <= _FEW_EXT_BYTES:
        offsets = (match.start() + _EXT_HEADER_LENGTHS[match[0][0]] - 1 for match in _EXT_HEAD.finditer(data))
        return sum(1 for offset in offsets if offset < len(data) and data[offset] in codes)
    array = np.frombuffer(data, np.uint8)
    at_code = array == codes[0]
    for code in codes[1:]:
        at_code |= array == code
    fixext_heads = (array[:-1] - np.uint8(_FIXEXT_FIRST)) <= _FIXEXT_LAST - _FIXEXT_FIRST  # uint8: wraps below
    count = int(np.count_nonzero(at_code[1:] & fixext_heads))
    for offset, head in _EXT_TYPE_OFFSETS:
        count += int(np.count_nonzero(at_code[offset:] & (array[:-offset] == head)))
    return count


def _may_start_run(document: bytes, position: int) -> bool:
    """Whether the scalar at ``position`` and the one _MIN_RUN - 1 further (if all are alike) look alike."""
    head = document[position] if position < len(document) else None
    if head in _ONE_BYTE_HEADS:
        return position + _MIN_RUN <= len(document) and document[position + _MIN_RUN - 1] in _ONE_BYTE_HEADS
    stride = _INT_STRIDES.get(head)
    last = position + (_MIN_RUN - 1) * stride if stride is not None else len(document)
    return last < len(document) and document[last] == head


def _run_length(document: bytes, start: int, stride: int, count: int) -> int:
    """How many of the ``count`` scalars of ``stride`` bytes from ``start`` have the same head as the first (any
    one-byte scalar, if ``stride`` is 1), checked at C speed."""
    if stride == 1:  # a character class: lstrip with 131 bytes to strip took ~12 ns per byte, 50 ms per 4 MiB
        return _ONE_BYTE_RUN.match(document, start, start + count).end() - start
    heads = document[start : start + stride * count : stride]
    return count - len(heads.lstrip(heads[:1]))


@functools.cache
def _few_mixed(count: int) -> "re.Pattern[bytes]":
    return re.compile(b"(?>%s){%d}" % (_INT_OR_ONE_BYTE_SCALAR, count), re.DOTALL)  # atomic: fails sooner


def _mixed_run_bytes(document: bytes, heads_only: Optional[memoryview], start: int, count: int) -> int:
    """The length of the ``count`` scalars from ``start`` if all are ints or one-byte scalars, of any widths, else 0:
    more than _FEW_MIXED are checked at C speed in ``heads_only``, the document translated by _INT_HEADS_ONLY."""
    if count <= _FEW_MIXED:
        match = _few_mixed(count).match(document, start)
        return 0 if match is None else match.end() - start
    unpacker = msgpack.Unpacker(max_buffer_size=9 * count + 5)
    unpacker.feed(b"\xdd" + count.to_bytes(4, "big"))
    unpacker.feed(heads_only[start : start + 9 * count])
    try:
        unpacker.skip()
    except (ValueError, msgpack.UnpackException):
        return 0
    return unpacker.tell() - 5


def _walked_structure_weight(data: bytes, max_steps: int) -> Optional[int]:
    """
    The structure weight of ``data`` counting only the arrays, maps and ext types that it really holds (binary and
    text strings are skipped at C speed: their bytes decode as payload whatever they look like); an ext type's
    payload is walked in turn as a document of its own (a tuple's items, a registered type's fields); bytes after a
    document's first object are weighed by :func:`_structure_weight`. None if the walk would take more than
    ``max_steps`` objects, copy more than a few times ``data``, or the document is malformed (then the caller keeps
    the upper bound).
    """
    weight, steps, documents, bytes_left = 0, 0, [data], 4 * len(data)
    registered = MSGPackSerializer.registered_type_codes()
    try:
        while documents:
            document = documents.pop()
            bytes_left -= len(document)
            if bytes_left < 0:
                return None
            unpacker = msgpack.Unpacker(max_buffer_size=max(len(document), 1))
            unpacker.feed(document)
            # array_left: elements left in the array being read while all read so far were scalars (a run of ints
            # is looked for only there, among at most ``window`` of them: in a map, each int is hashed and stored)
            # a run of mixed widths is looked for at most once per _MIN_RUN elements that are not in one (mixed_at),
            # among ``mixed`` of them (so that a run of one width, weighed less, is not taken into one)
            pending, array_left, window, mixed, mixed_at, heads_only = 1, 0, _MIN_RUN, _MIN_RUN, 0, None
            while pending:
                if steps >= max_steps:
                    return None
                steps, pending, position = steps + 1, pending - 1, unpacker.tell()
                head = document[position]
                if head in _ARRAY_HEADS:
                    length = unpacker.read_array_header()
                    weight += STRUCTURE_BYTE_WEIGHT
                    start = unpacker.tell()
                    stride = _FLOAT_STRIDES.get(document[start]) if length >= 8 else None
                    # a run of floats (a tensor's .tolist()) decodes at C speed: checked and skipped at C speed too
                    end = start + stride * length if stride is not None else 0
                    if stride is not None and end <= len(document) and (stride + 1) * length <= bytes_left:
                        bytes_left -= (stride + 1) * length  # what checking and skipping it copies
                        if document[start:end:stride].count(document[start]) == length:
                            unpacker.read_bytes(stride * length)
                            weight, array_left = weight + FLOAT_RUN_BYTE_WEIGHT * stride * length, 0
                            continue
                    pending, array_left = pending + length, length
                elif head in _MAP_HEADS:
                    pending += 2 * unpacker.read_map_header()
                    weight, array_left = weight + STRUCTURE_BYTE_WEIGHT, 0
                elif head in _RUN_HEADS and array_left >= _MIN_RUN:
                    stride, run, run_bytes = _INT_STRIDES.get(head, 1), 0, 0
                    if _may_start_run(document, position):
                        count = min(array_left, window, (len(document) - position) // stride)
                        bytes_left -= 2 * count  # what checking a run of one width copies
                        run = _run_length(document, position, stride, count)
                        window = 2 * run if run >= _MIN_RUN else max(_MIN_RUN, window // 2)
                    if run >= _MIN_RUN:  # of one width: its payload weighed as scalars'
                        run_bytes, new_ints, mixed = stride * run, stride == 1 or head == 0xD0, _MIN_RUN
                        weight += SCALAR_BYTE_WEIGHT * run_bytes
                    elif steps >= mixed_at and not _may_start_run(document, position + stride):
                        # of mixed widths (not a lone element before a run of one width), a mispredicted branch each
                        run, new_ints, steps = min(array_left, mixed), True, steps + _MIXED_CHECK_STEPS
                        if heads_only is None and run > _FEW_MIXED:
                            bytes_left -= len(document)
                            heads_only = memoryview(document.translate(_INT_HEADS_ONLY))
                        run_bytes = _mixed_run_bytes(document, heads_only, position, run) if bytes_left >= 0 else 0
                        # what parsing it takes (copying at most 9 bytes per element skipped), or what was copied
                        bytes_left -= run_bytes or min(9 * run, len(document) - position)
                        weight += (SCALAR_BYTE_WEIGHT + MIXED_RUN_BYTE_WEIGHT) * run_bytes
                        if run_bytes:
                            mixed *= 2
                        elif mixed > _MIN_RUN:  # shorter, maybe: looked for among half as many at the next step
                            mixed //= 2
                        else:  # none here: looked for again _MIN_RUN elements on
                            mixed_at = steps + _MIN_RUN
                    if bytes_left < 0:
                        return None
                    if run_bytes == 0:
                        unpacker.skip()
                        weight, array_left = weight + SCALAR_BYTE_WEIGHT * stride, array_left - 1
                        continue
                    if new_ints:  # its bytes that may be fixints below -5 or int 8 heads (or a wider int's payload)
                        new = document[position : position + run_bytes].translate(None, _NOT_RUN_NEW_INT_BYTES)
                        weight += NEW_INT_BYTE_WEIGHT * len(new)
                    unpacker.read_bytes(run_bytes)
                    pending, array_left = pending + 1 - run, array_left - run
                else:
                    unpacker.skip()
                    array_left -= 1
                    if head in _EXT_HEADER_LENGTHS:  # decoded by Python code, its payload by another decoder
                        payload_start = position + _EXT_HEADER_LENGTHS[head]
                        weight, array_left = weight + EXT_BYTE_WEIGHT, 0
                        if document[payload_start - 1] in registered:
                            weight += REGISTERED_EXT_WEIGHT
                        documents.append(document[payload_start : unpacker.tell()])
                    elif head not in _PAYLOAD_HEADS:
                        weight += SCALAR_BYTE_WEIGHT * (unpacker.tell() - position)
            weight += _structure_weight(document[unpacker.tell() :])
    except Exception:
        return None
    return weight


def _top_level_tuple_discount(data: bytes) -> int:
    """What both weighings charged beyond TOP_LEVEL_TUPLE_WEIGHT for a tuple that starts ``data`` and the array
    head that starts its payload (0 if ``data`` does not start so)."""
    code_at = _EXT_HEADER_LENGTHS.get(data[0], 0) - 1 if data else -1
    if code_at < 1 or code_at + 1 >= len(data) or data[code_at] != MSGPackSerializer.TUPLE_EXT_TYPE_CODE:
        return 0
    if data[code_at + 1] not in _ARRAY_HEADS:
        return 0
    return EXT_BYTE_WEIGHT + STRUCTURE_BYTE_WEIGHT - TOP_LEVEL_TUPLE_WEIGHT


def decode_cost(data: bytes) -> float:
    """
    What decoding ``data`` (msgpack, maybe with a suffix) costs, in items; an upper bound, computed at C speed (and by
    a short walk of its objects when the bytes alone would overcharge it, e.g. large binary strings inside a list).
    """
    if not data:
        return 0.0
    weighted = len(data)
    if data[0] not in _SCALAR_STARTS:
        structure = _structure_weight(data)
        if structure > STORE_BYTES_PER_ITEM and len(data) >= WALK_MIN_BYTES:
            walked = _walked_structure_weight(data, max_steps=len(data) // WALK_BYTES_PER_STEP + 4)
            structure = structure if walked is None else min(structure, walked)
        weighted += structure
    return weighted / STORE_BYTES_PER_ITEM


def store_item_cost(subkey: bytes, value: bytes, whole_dictionary: bool = False) -> float:
    """What one store item costs in items: one, plus decoding its subkey and value (a whole dictionary's value is
    charged on its own, see PeerRateLimiter.allow_dictionary). A tuple that starts the subkey or the value weighs
    TOP_LEVEL_TUPLE_WEIGHT with its array head. A whole dictionary's entry costs the same (request_checks.
    dictionary_layout): it was charged one item unless decoding its subkey and value cost more, so an entry with a
    tuple subkey or a tuple value cost one item, as an int one, where storing it takes ~1.3 times the CPU (a fresh
    peer's burst of them 0.31-0.62 s, int entries 0.26-0.34 s); (i, i + 1) -> int entries now cost ~1.3 items."""
    cost = 1.0 + decode_cost(subkey) - _top_level_tuple_discount(subkey) / STORE_BYTES_PER_ITEM
    if not whole_dictionary:
        cost += decode_cost(value) - _top_level_tuple_discount(value) / STORE_BYTES_PER_ITEM
    return cost


class PeerRateLimiter:
    """
    Each peer may spend up to ``burst`` items at once; its allowance refills at ``rate`` items per second. A request
    that does not fit is refused whole (nothing is spent), except that a peer holding at least LENDING_SHARE of its
    allowance may borrow for one request of up to ``max_request`` items (if the caller allows it): its allowance goes
    below zero, and it waits that much longer before its next request fits. Peers whose buckets are full again are
    forgotten, so the table stays as small as the set of recently active peers.
    """

    def __init__(
        self,
        burst: float = DEFAULT_BURST_ITEMS,
        rate: float = DEFAULT_ITEMS_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        max_request: Optional[float] = None,
    ):
        max_request = burst * DEFAULT_MAX_REQUEST_ITEMS / DEFAULT_BURST_ITEMS if max_request is None else max_request
        if burst <= 0 or rate <= 0 or max_request < burst:
            raise ValueError(
                f"burst and rate must be positive and max_request >= burst, got {burst=}, {rate=}, {max_request=}"
            )
        self.burst, self.rate, self.clock, self.max_request = burst, rate, clock, max_request
        self._buckets: Dict[Hashable, Tuple[float, float]] = {}  # peer -> (tokens left, time of last update)

    def _tokens(self, peer: Hashable, now: float) -> float:
        tokens, updated = self._buckets.get(peer, (self.burst, now))
        return min(self.burst, tokens + (now - updated) * self.rate)

    def allow(self, peer: Hashable, num_items: float, may_borrow: bool = False) -> bool:
        """
        Spend ``num_items`` tokens of ``peer`` if it has them, or (``may_borrow``) if it holds at least
        LENDING_SHARE of its allowance and ``num_items`` is at most ``max_request``; returns whether the request may
        proceed.
        """
        now = self.clock()
        tokens = self._tokens(peer, now)
        borrows = may_borrow and self._may_borrow(tokens, num_items)
        if num_items > tokens and not borrows:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - num_items, now)
        if len(self._buckets) > 1024:
            self._forget_idle(now)
        return True

    def fits(self, peer: Hashable, num_items: float, may_borrow: bool = False) -> bool:
        """Whether :meth:`allow` would let ``peer`` spend ``num_items`` now (nothing is spent)."""
        tokens = self._tokens(peer, self.clock())
        return num_items <= tokens or (may_borrow and self._may_borrow(tokens, num_items))

    def _may_borrow(self, tokens: float, num_items: float) -> bool:
        return tokens >= LENDING_SHARE * self.burst and num_items <= self.max_request

    def spend_at_most(self, peer: Hashable, num_items: float) -> None:
        """Spend up to ``num_items`` tokens of ``peer``, as many as it has (for work done on a refused request)."""
        now = self.clock()
        tokens = self._tokens(peer, now)
        if tokens > 0:
            self._buckets[peer] = (max(0.0, tokens - num_items), now)

    def tokens(self, peer: Hashable) -> float:
        """What ``peer`` may spend now (below zero: its debt)."""
        return self._tokens(peer, self.clock())

    def allow_dictionary(self, peer: Optional[Hashable], num_items: float, loan_floor: Optional[float] = None) -> bool:
        """Charge a part of a whole dictionary's cost (see DHTProtocol's store handling); one sent by no remote peer
        (``peer`` None: replication and caching within this node) is free. One in a request that borrowed is charged
        after that request put the peer in debt: it may go on borrowing while the peer's tokens stay at or above
        ``loan_floor`` (DICTIONARY_LOAN_ITEMS below what the request left)."""
        if peer is None:
            return True
        now = self.clock()
        tokens = self._tokens(peer, now)
        if loan_floor is not None and tokens - num_items >= loan_floor:
            self._buckets[peer] = (tokens - num_items, now)
            return True
        return self.allow(peer, num_items)

    def _forget_idle(self, now: float) -> None:
        for peer in [peer for peer in self._buckets if self._tokens(peer, now) >= self.burst]:
            del self._buckets[peer]

    def __len__(self) -> int:
        return len(self._buckets)
