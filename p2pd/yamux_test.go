package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// openYamuxStream makes a yamux connection over the two ends of a pipe, opens a stream from the client side and
// writes one byte (1) on it (the SYN goes out with the first write; the ACK with the window grant comes back when
// the server accepts it). It returns the client's stream and the server's accepted one; both connections close
// when the test ends.
func openYamuxStream(t *testing.T, clientConn, serverConn net.Conn) (network.MuxedStream, network.MuxedStream) {
	t.Helper()
	transport := newYamuxTransport()
	server, err := transport.NewConn(serverConn, true, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	client, err := transport.NewConn(clientConn, false, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	accepted := make(chan network.MuxedStream, 1)
	go func() {
		if s, err := server.AcceptStream(); err == nil {
			accepted <- s
		}
	}()
	stream, err := client.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Write([]byte{1}); err != nil {
		t.Fatal(err)
	}
	select {
	case remote := <-accepted:
		return stream, remote
	case <-time.After(5 * time.Second):
		t.Fatal("stream was not accepted")
	}
	return nil, nil
}

// A stream's first window update grants the configured initial window at once: the opener can write several
// MiB before the other side reads a byte (with yamux defaults it stops after 256 KiB).
func TestInitialStreamWindowIsGrantedAtOnce(t *testing.T) {
	clientConn, serverConn := net.Pipe()
	stream, remote := openYamuxStream(t, clientConn, serverConn)

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

// countingConn counts the yamux data frames written on a connection (yamux writes each frame, header and body,
// with one Write; the header's second byte is the frame type, 0 for data).
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	if len(p) > 12 && p[1] == 0 {
		c.writes.Add(1)
	}
	return c.Conn.Write(p)
}

// A chunk the shared-memory pipe forwards (and a full copy buffer of a socket stream) goes out in whole frames:
// a write of exactly 256 KiB used to become a full frame plus a 12-byte one, each with its own TLS record,
// system call and record to the receiving client.
func TestForwardedChunksFillWholeYamuxFrames(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int
		frames int64
	}{{"shm pipe chunk", shmMaxForward, 1}, {"copy buffer", copyBufferSize, 4}} {
		t.Run(tc.name, func(t *testing.T) {
			clientRaw, serverConn := net.Pipe()
			clientConn := &countingConn{Conn: clientRaw}
			stream, remote := openYamuxStream(t, clientConn, serverConn)
			if _, err := io.ReadFull(remote, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			// the window grant goes out when the stream is accepted, before this byte: once the byte is here, the
			// whole initial window is open
			if _, err := remote.Write([]byte{2}); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(stream, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			before := clientConn.writes.Load()
			if _, err := stream.Write(make([]byte, tc.size)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(remote, make([]byte, tc.size)); err != nil {
				t.Fatal(err)
			}
			if frames := clientConn.writes.Load() - before; frames != tc.frames {
				t.Fatalf("a write of %d bytes went out as %d frames, want %d", tc.size, frames, tc.frames)
			}
		})
	}
}
