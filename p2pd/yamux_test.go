package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/sec"
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

// buffersConn offers WriteBuffers (as p2pd's batching security layer does) and records whether a frame payload it
// was given is the very memory a stream writer passed to Write.
type buffersConn struct {
	net.Conn
	payload   []byte // the writer's buffer
	inPlace   atomic.Int64
	joinedBuf []byte
}

func (c *buffersConn) WriteBuffers(bufs ...[]byte) (int, error) {
	for _, b := range bufs {
		if len(b) > 0 && len(c.payload) > 0 && &b[0] == &c.payload[0] {
			c.inPlace.Add(1)
		}
	}
	c.joinedBuf = c.joinedBuf[:0]
	for _, b := range bufs {
		c.joinedBuf = append(c.joinedBuf, b...)
	}
	return c.Conn.Write(c.joinedBuf)
}

// A large write leaves the process in the writer's own buffer: the patched go-yamux (third_party/go-yamux) hands it
// to the connection's WriteBuffers instead of copying it into a frame buffer first, and the peer gets the same bytes.
func TestLargeYamuxFramesAreSentFromTheWritersBuffer(t *testing.T) {
	clientRaw, serverConn := net.Pipe()
	clientConn := &buffersConn{Conn: clientRaw}
	stream, remote := openYamuxStream(t, clientConn, serverConn)
	if _, err := io.ReadFull(remote, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, yamuxFramePayload)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	clientConn.payload = payload
	received := make(chan []byte, 1)
	go func() {
		buf := make([]byte, len(payload))
		if _, err := io.ReadFull(remote, buf); err == nil {
			received <- buf
		}
		close(received)
	}()
	if _, err := stream.Write(payload); err != nil {
		t.Fatal(err)
	}
	if got := <-received; !bytes.Equal(got, payload) {
		t.Fatal("the peer received other bytes than were written")
	}
	if n := clientConn.inPlace.Load(); n != 1 {
		t.Fatalf("the frame's payload reached the connection from the writer's buffer %d times, want 1", n)
	}
}

// recordingConn counts the writes that reach the socket under the security layer.
type recordingConn struct {
	net.Conn
	writes [][]byte
}

func (c *recordingConn) Write(p []byte) (int, error) {
	c.writes = append(c.writes, append([]byte(nil), p...))
	return len(p), nil
}

// plainSecureConn stands for TLS in batchedSecureConn: its Writes go unchanged to the raw connection.
type plainSecureConn struct {
	sec.SecureConn
	raw net.Conn
}

func (c *plainSecureConn) Write(p []byte) (int, error) { return c.raw.Write(p) }

// A frame written as header and payload (WriteBuffers) reaches the socket in one system call, as one Write would.
func TestWriteBuffersIsOneWriteBatch(t *testing.T) {
	socket := &recordingConn{}
	raw := newBatchConn(socket)
	conn := &batchedSecureConn{SecureConn: &plainSecureConn{raw: raw}, raw: raw}
	header, payload := []byte("header-bytes"), bytes.Repeat([]byte{5}, 100<<10)
	n, err := conn.WriteBuffers(header, payload)
	if err != nil || n != len(header)+len(payload) {
		t.Fatalf("WriteBuffers wrote %d bytes (%v), want %d", n, err, len(header)+len(payload))
	}
	if len(socket.writes) != 1 || !bytes.Equal(socket.writes[0], append(append([]byte(nil), header...), payload...)) {
		t.Fatalf("the socket got %d writes, want one with the header and the payload", len(socket.writes))
	}
}

// readTrackingConn records whether the session read a frame payload straight into a given buffer.
type readTrackingConn struct {
	net.Conn
	target []byte
	direct atomic.Int64
}

func (c *readTrackingConn) Read(p []byte) (int, error) {
	if len(p) > 0 && len(c.target) > 0 {
		start, end := &c.target[0], &c.target[len(c.target)-1]
		if uintptr(unsafe.Pointer(&p[0])) >= uintptr(unsafe.Pointer(start)) &&
			uintptr(unsafe.Pointer(&p[0])) <= uintptr(unsafe.Pointer(end)) {
			c.direct.Add(1)
		}
	}
	return c.Conn.Read(p)
}

// A reader that waits in Read when a frame arrives gets its payload read straight into its buffer (the patched
// go-yamux skips its receive buffer then); the bytes are the ones sent, in order. (On a loaded machine the reader
// may be elsewhere whenever a frame arrives: up to 8 rounds of 32 frames, until one was read straight in.)
func TestYamuxReadsFramesIntoTheWaitingReadersBuffer(t *testing.T) {
	const rounds, frames, frameSize = 8, 32, 64 << 10
	buf := make([]byte, frames*frameSize)
	clientConn, serverRaw := net.Pipe()
	serverConn := &readTrackingConn{Conn: serverRaw, target: buf}
	stream, remote := openYamuxStream(t, clientConn, serverConn)
	if _, err := io.ReadFull(remote, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	sent := make([]byte, len(buf))
	for round := 0; round < rounds && serverConn.direct.Load() == 0; round++ {
		for i := range sent {
			sent[i] = byte(i*13 + round)
		}
		read := make(chan error, 1)
		go func() {
			_, err := io.ReadFull(remote, buf)
			read <- err
		}()
		for i := 0; i < frames; i++ { // one write per frame, so that the reader waits in Read between frames
			if _, err := stream.Write(sent[i*frameSize : (i+1)*frameSize]); err != nil {
				t.Fatal(err)
			}
		}
		if err := <-read; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, sent) {
			t.Fatal("the reader got other bytes than were sent")
		}
	}
	if serverConn.direct.Load() == 0 {
		t.Fatalf("none of %d frames was read straight into the waiting reader's buffer", rounds*frames)
	}
}
