package main

// Native Go fuzz tests of what p2pd reads from its clients and from remote peers: varint-delimited framing, the
// hand-written protobuf decoders of the control protocol and the shared-memory pipe records. With plain `go test`
// they run their seed corpus only; to fuzz one of them for a while:
//
//	cd p2pd && go test -run '^$' -fuzz '^FuzzDecodeRequest$' -fuzztime 60s .
//
// A decoder may refuse any input with an error, but must not panic, and must never hand out more than it read.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"sync"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

const fuzzMaxMsg = 1 << 16

func fuzzDelimited(msg []byte) []byte {
	return append(protowire.AppendVarint(nil, uint64(len(msg))), msg...)
}

func FuzzReadDelimited(f *testing.F) {
	f.Add(fuzzDelimited([]byte("hello")))
	f.Add([]byte{0x80, 0x80, 0x80, 0x80, 0x04}) // announces 1 GiB, sends nothing
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReader(bytes.NewReader(data))
		for {
			var reserved int
			msg, err := readDelimitedReserving(r, fuzzMaxMsg, func(n int) error { reserved += n; return nil })
			if reserved > len(data)+firstReadChunk {
				t.Fatalf("reserved %d bytes for %d bytes of input", reserved, len(data))
			}
			if err != nil {
				return
			}
			if len(msg) > fuzzMaxMsg || len(msg) > len(data) {
				t.Fatalf("a %d-byte message from %d bytes of input (limit %d)", len(msg), len(data), fuzzMaxMsg)
			}
		}
	})
}

func FuzzDecodeRequest(f *testing.F) {
	peerID := []byte{0x00, 0x24, 0x08, 0x01, 0x12, 0x20}
	peerID = append(peerID, bytes.Repeat([]byte{7}, 32)...)
	connect := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), peerID)
	f.Add(protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 0)) // IDENTIFY
	f.Add(protowire.AppendBytes(
		protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 1),
		connect,
	))
	f.Add([]byte{0x08, 0x03, 0x22, 0x05, 0x0a, 0x03, 0x01, 0x02})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = decodeRequest(data)
		_, _ = decodePeerRequest("fuzz", data, true)
		_, _ = decodePeerRequest("fuzz", data, false)
		_, _ = decodeHandlerRequest("fuzz", data)
		_, _, _ = decodeRequestToPeer("fuzz", data, true)
		_, _, _ = decodeHandlerRegistration("fuzz", "fuzz", data)
	})
}

func FuzzDecodePersistentRequest(f *testing.F) {
	call := encodeCallUnary(&callUnaryRequest{peer: []byte("peer"), proto: "p", data: []byte("d")})
	f.Add(call)
	f.Add(append(protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte("0123456789abcdef")),
		call...))
	f.Add([]byte{0x0a, 0x10})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, _ = decodePersistentRequest(data)
		_, _ = decodeUnaryHandlerRequest(data)
		_, _ = decodeCallUnary(data)
		if id := peekCallID(data); len(id) > len(data) {
			t.Fatalf("a %d-byte call id from %d bytes", len(id), len(data))
		}
	})
}

// FuzzShmRecords applies a client's records (type byte + little-endian uint64) to a pipe's accounting: whatever
// the records say, the daemon never counts more unacknowledged bytes than the ring holds, and an acknowledgement
// never takes more than was sent.
func FuzzShmRecords(f *testing.F) {
	record := func(kind byte, n uint64) []byte {
		out := []byte{kind}
		return binary.LittleEndian.AppendUint64(out, n)
	}
	f.Add(append(append(record(shmRecordData, 100), record(shmRecordAck, 10)...), record(shmRecordEOF, 0)...))
	f.Add(record(shmRecordData, 1<<63))
	f.Add(record(shmRecordAck, ^uint64(0)))
	f.Fuzz(func(t *testing.T, data []byte) {
		const ringSize = 4096
		p := &shmPipe{size: ringSize, downUnacked: 1000}
		p.changed = sync.NewCond(&p.mu)
		for len(data) >= shmRecordLen {
			before := p.downUnacked
			err := p.applyRecord(data[0], binary.LittleEndian.Uint64(data[1:shmRecordLen]))
			data = data[shmRecordLen:]
			if p.upUnacked > ringSize || p.upAvail > p.upUnacked {
				t.Fatalf("ring accounting broke: %d available, %d unacknowledged of %d", p.upAvail, p.upUnacked, ringSize)
			}
			if p.downUnacked > before {
				t.Fatalf("an acknowledgement raised the unacknowledged count from %d to %d", before, p.downUnacked)
			}
			if err != nil {
				return // the daemon aborts the pipe on the first bad record
			}
		}
	})
}
