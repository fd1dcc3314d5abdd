package main

import (
	"bytes"
	"io"
	"net"
	"testing"
)

// A connection holds a small read buffer until a read fills it (anyone can keep up to the transient limit of
// connections in their handshake, and small messages need no more); then a large one. Bytes come out in order.
func TestBatchConnReadBufferGrowsOnlyWithBulkData(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	raw := newBatchConn(server)
	defer raw.Close()
	sent := make([]byte, 4<<20)
	for i := range sent {
		sent[i] = byte(i*7 + i>>12)
	}
	go func() {
		_, _ = client.Write(sent[:100]) // a small message first (a handshake, a DHT request)
		_, _ = client.Write(sent[100:])
	}()
	got := make([]byte, 0, len(sent))
	chunk := make([]byte, 1000) // (smaller than the buffers, as the security layers read)
	for len(got) < 100 {
		n, err := raw.Read(chunk[:100-len(got)])
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, chunk[:n]...)
	}
	if size := raw.reader.Size(); size != initialReadBufferSize {
		t.Fatalf("after a small message the read buffer has %d bytes, want %d", size, initialReadBufferSize)
	}
	for len(got) < len(sent) {
		n, err := raw.Read(chunk)
		if err != nil && err != io.EOF {
			t.Fatal(err)
		}
		got = append(got, chunk[:n]...)
	}
	if !bytes.Equal(got, sent) {
		t.Fatal("the bytes read are not the bytes sent")
	}
	if size := raw.reader.Size(); size != rawReadBufferSize {
		t.Fatalf("after %d bytes of bulk data the read buffer has %d bytes, want %d", len(sent), size, rawReadBufferSize)
	}
}
