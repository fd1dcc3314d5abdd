package main

// Unit tests of the hand-written protobuf codecs and the framing (no network): `cd p2pd && go test ./...`.

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"testing"

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
