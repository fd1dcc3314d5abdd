package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// A stream's first window update grants the configured initial window at once: the opener can write several
// MiB before the other side reads a byte (with yamux defaults it stops after 256 KiB).
func TestInitialStreamWindowIsGrantedAtOnce(t *testing.T) {
	clientConn, serverConn := net.Pipe()
	transport := newYamuxTransport()
	server, err := transport.NewConn(serverConn, true, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	client, err := transport.NewConn(clientConn, false, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	accepted := make(chan network.MuxedStream, 1)
	go func() {
		s, err := server.AcceptStream()
		if err == nil {
			accepted <- s
		}
	}()
	stream, err := client.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// the SYN goes out with the first write; the ACK with the window grant comes back when it is accepted
	if _, err := stream.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	var remote network.MuxedStream
	select {
	case remote = <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("stream was not accepted")
	}

	payload := bytes.Repeat([]byte{7}, 8<<20)
	_ = stream.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := stream.Write(payload); err != nil { // nobody reads yet: only the window lets this finish
		t.Fatalf("writing 8 MiB before the peer reads failed: %v", err)
	}
	received := make([]byte, 1+len(payload))
	if _, err := io.ReadFull(remote, received); err != nil {
		t.Fatal(err)
	}
	if received[0] != 1 || !bytes.Equal(received[1:], payload) {
		t.Fatal("stream bytes differ from what was written")
	}
}
