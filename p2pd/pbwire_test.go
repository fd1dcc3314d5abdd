package main

// Unit tests of the hand-written protobuf codecs and the framing (no network): `cd p2pd && go test ./...`.

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

func TestDelimitedRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	for _, msg := range [][]byte{{}, []byte("x"), bytes.Repeat([]byte("y"), 70000)} {
		if err := writeDelimited(&buf, msg); err != nil {
			t.Fatal(err)
		}
	}
	r := bufio.NewReader(&buf)
	for _, want := range []int{0, 1, 70000} {
		got, err := readDelimited(r, 1<<20)
		if err != nil || len(got) != want {
			t.Fatalf("got %d bytes, err %v; want %d", len(got), err, want)
		}
	}
	if _, err := readDelimited(r, 1<<20); err != io.EOF {
		t.Fatalf("want EOF at the end, got %v", err)
	}
}

func TestReadDelimitedRejectsOversizedMessage(t *testing.T) {
	var buf bytes.Buffer
	_ = writeDelimited(&buf, make([]byte, 100))
	_, err := readDelimited(bufio.NewReader(&buf), 99)
	var tooLarge *tooLargeError
	if !errors.As(err, &tooLarge) || tooLarge.size != 100 {
		t.Fatalf("want tooLargeError of 100 bytes, got %v", err)
	}
}

func TestReadDelimitedKeepsLargeMessagesIntact(t *testing.T) {
	for _, size := range []int{firstReadChunk - 1, firstReadChunk, firstReadChunk + 1, 100000, 5<<20 + 3} {
		msg := make([]byte, size)
		for i := range msg {
			msg[i] = byte(i * 7)
		}
		var buf bytes.Buffer
		_ = writeDelimited(&buf, msg)
		reserved := 0
		got, err := readDelimitedReserving(bufio.NewReader(&buf), 8<<20, func(n int) error { reserved += n; return nil })
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("size %d: got %d bytes, err %v", size, len(got), err)
		}
		if reserved != cap(got) || cap(got) != size {
			t.Fatalf("size %d: reserved %d bytes for a buffer of capacity %d", size, reserved, cap(got))
		}
	}
}

// A peer announcing 1 GiB and sending 100 KB costs about what it sent, not what it announced.
func TestReadDelimitedAllocatesOnlyForReceivedBytes(t *testing.T) {
	sent := 100 * 1000
	wire := protowire.AppendVarint(nil, 1<<30)
	wire = append(wire, make([]byte, sent)...)
	reserved := 0
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := readDelimitedReserving(bufio.NewReader(bytes.NewReader(wire)), 2<<30,
		func(n int) error { reserved += n; return nil })
	runtime.ReadMemStats(&after)
	if err != io.ErrUnexpectedEOF {
		t.Fatalf("want ErrUnexpectedEOF for a truncated body, got %v", err)
	}
	if limit := 2*sent + firstReadChunk; reserved > limit {
		t.Fatalf("reserved %d bytes for %d received (limit %d)", reserved, sent, limit)
	}
	if allocated := after.TotalAlloc - before.TotalAlloc; allocated > 4<<20 {
		t.Fatalf("allocated %d bytes for %d received", allocated, sent)
	}
}

// An announced size above the limit is refused before any of the body is read or allocated.
func TestReadDelimitedRefusesAboveMaxSizeBeforeReading(t *testing.T) {
	wire := protowire.AppendVarint(nil, 1<<30)
	wire = append(wire, "body"...)
	r := bufio.NewReader(bytes.NewReader(wire))
	called := false
	_, err := readDelimitedReserving(r, 4<<20, func(int) error { called = true; return nil })
	var tooLarge *tooLargeError
	if !errors.As(err, &tooLarge) || tooLarge.size != 1<<30 || tooLarge.limit != 4<<20 || called {
		t.Fatalf("want tooLargeError(1 GiB > 4 MiB) without a reservation, got %v (reserved: %v)", err, called)
	}
	if rest, _ := io.ReadAll(r); string(rest) != "body" {
		t.Fatalf("the body must stay unread, got %q", rest)
	}
}

func TestReadDelimitedStopsWhenReservationFails(t *testing.T) {
	var buf bytes.Buffer
	_ = writeDelimited(&buf, make([]byte, 1<<20))
	limit := errors.New("limit reached")
	reserved := 0
	_, err := readDelimitedReserving(bufio.NewReader(&buf), 4<<20, func(n int) error {
		if reserved+n > 256<<10 {
			return limit
		}
		reserved += n
		return nil
	})
	if err != limit {
		t.Fatalf("want the reservation error, got %v", err)
	}
}

// pipeWithDeadlines returns the reading end of a connection with working read deadlines and its writing end.
func pipeWithDeadlines(t *testing.T) (net.Conn, net.Conn) {
	reader, writer := net.Pipe()
	t.Cleanup(func() { _ = reader.Close(); _ = writer.Close() })
	return reader, writer
}

// A sender that stops in the middle of a message is dropped after the stall timeout.
func TestStallReaderDropsAStalledMessage(t *testing.T) {
	reader, writer := pipeWithDeadlines(t)
	go func() {
		_, _ = writer.Write(protowire.AppendVarint(nil, 1000))
		_, _ = writer.Write(make([]byte, 500)) // then nothing more, connection kept open
	}()
	result := make(chan error, 1)
	go func() {
		_, err := readDelimited(bufio.NewReader(&stallReader{s: reader, timeout: 100 * time.Millisecond}), 1<<20)
		result <- err
	}()
	select {
	case err := <-result:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("want a deadline error, got %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("still waiting for the rest of the message after 3 s (stall timeout: 100 ms)")
	}
}

// The timeout is for silence, not for the whole message: a message that keeps arriving may take longer.
func TestStallReaderAcceptsASlowButSteadyMessage(t *testing.T) {
	reader, writer := pipeWithDeadlines(t)
	go func() {
		_, _ = writer.Write(protowire.AppendVarint(nil, 10))
		for i := 0; i < 10; i++ {
			time.Sleep(100 * time.Millisecond)
			_, _ = writer.Write([]byte{byte(i)})
		}
	}()
	// 1 s in all, twice the timeout; each gap leaves 400 ms for a loaded machine to schedule the writer late
	got, err := readDelimited(bufio.NewReader(&stallReader{s: reader, timeout: 500 * time.Millisecond}), 1<<20)
	if err != nil || !bytes.Equal(got, []byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}) {
		t.Fatalf("got %v, %v", got, err)
	}
}

// With waitFirst (an answer waiting for a handler) the first byte may take any time; after stop, so may the rest.
func TestStallReaderWaitFirstAndStop(t *testing.T) {
	reader, writer := pipeWithDeadlines(t)
	go func() {
		time.Sleep(300 * time.Millisecond)
		_, _ = writer.Write(append(protowire.AppendVarint(nil, 2), 'o', 'k'))
		time.Sleep(300 * time.Millisecond)
		_, _ = writer.Write([]byte{'!'})
	}()
	in := &stallReader{s: reader, timeout: 100 * time.Millisecond, waitFirst: true}
	r := bufio.NewReader(in)
	got, err := readDelimited(r, 1<<20)
	if err != nil || string(got) != "ok" {
		t.Fatalf("got %q, %v", got, err)
	}
	in.stop()
	if b, err := r.ReadByte(); err != nil || b != '!' {
		t.Fatalf("after stop: got %q, %v", b, err)
	}
}

func TestReadDelimitedRejectsOverlongVarint(t *testing.T) {
	r := bufio.NewReader(bytes.NewReader(bytes.Repeat([]byte{0xff}, 11)))
	if _, err := readDelimited(r, 1<<20); err == nil {
		t.Fatal("an 11-byte varint must be rejected")
	}
}

func TestReadDelimitedTruncatedBody(t *testing.T) {
	r := bufio.NewReader(bytes.NewReader([]byte{5, 1, 2}))
	if _, err := readDelimited(r, 1<<20); err != io.ErrUnexpectedEOF {
		t.Fatalf("want ErrUnexpectedEOF, got %v", err)
	}
}

func TestDecodeRequestNeedsType(t *testing.T) {
	if _, err := decodeRequest(appendBytesField(nil, 2, []byte{})); err == nil {
		t.Fatal("a Request without type must be rejected")
	}
	if _, err := decodeRequest([]byte{0x08}); err == nil {
		t.Fatal("a truncated varint must be rejected")
	}
	req, err := decodeRequest(appendVarintField(nil, 1, reqStreamOpen))
	if err != nil || req.typ != reqStreamOpen || req.streamOpen != nil {
		t.Fatalf("got %+v, %v", req, err)
	}
}

func TestCallUnaryRoundTripKeepsEmptyData(t *testing.T) {
	encoded := encodeCallUnary(&callUnaryRequest{peer: []byte("peer"), proto: "A.rpc_b", data: nil})
	decoded, err := decodeCallUnary(encoded)
	if err != nil {
		t.Fatal(err)
	}
	if string(decoded.peer) != "peer" || decoded.proto != "A.rpc_b" || len(decoded.data) != 0 {
		t.Fatalf("got %+v", decoded)
	}
	// `data` is required in proto2: it must be on the wire even when empty
	fields, _ := decodeFields(encoded)
	if len(fields) != 3 || fields[2].num != 3 {
		t.Fatalf("data field missing: %+v", fields)
	}
}

func TestPersistentRequestDecodingAndCallIDPeek(t *testing.T) {
	callID := bytes.Repeat([]byte{7}, 16)
	msg := appendBytesField(nil, 1, callID)
	msg = appendBytesField(msg, pcReqUnaryResponse, appendBytesField(nil, 1, nil))
	req, err := decodePersistentRequest(msg)
	if err != nil || !bytes.Equal(req.callID, callID) || req.kind != pcReqUnaryResponse {
		t.Fatalf("got %+v, %v", req, err)
	}
	if !bytes.Equal(peekCallID(msg[:20]), callID) {
		t.Fatal("peekCallID must find the call id in a prefix")
	}
	if peekCallID([]byte{0x12, 0x00}) != nil {
		t.Fatal("peekCallID must ignore other fields")
	}
	if _, err := decodePersistentRequest(appendBytesField(nil, pcReqCancel, nil)); err == nil {
		t.Fatal("a request without callId must be rejected")
	}
}

func TestErrorResponseLayout(t *testing.T) {
	fields, err := decodeFields(encodeErrorResponse("boom"))
	if err != nil || len(fields) != 2 || fields[0].value != respError || fields[1].typ != protowire.BytesType {
		t.Fatalf("got %+v, %v", fields, err)
	}
	inner, _ := decodeFields(fields[1].bytes)
	if string(inner[0].bytes) != "boom" {
		t.Fatalf("got %+v", inner)
	}
}

func TestRoundRobinTurnsAndRemoval(t *testing.T) {
	r := &roundRobin[string]{}
	r.add("a")
	r.add("b")
	r.add("c")
	if got := r.pick() + r.pick() + r.pick() + r.pick(); got != "abca" {
		t.Fatalf("got %s", got)
	}
	if !r.remove("b") || r.remove("z") || r.len() != 2 {
		t.Fatal("remove must delete exactly the given item")
	}
	if got := r.pick() + r.pick(); got != "ca" {
		t.Fatalf("got %s after removal", got)
	}
}
