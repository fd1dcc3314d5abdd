package main

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// A Read lent to a frame that its peer announced and then stopped sending in the middle ends once keep-alive cuts
// the peer off: it waits past its own read deadline (the bytes already read are in its buffer), not forever.
func TestReadIntoFrameStalledMidPayloadEndsWithSession(t *testing.T) {
	const frame = 64 << 10
	buf := make([]byte, frame)
	peerConn, serverRaw := net.Pipe()
	serverConn := &lentReadConn{Conn: serverRaw, target: buf, direct: make(chan struct{}, 1)}
	transport := newYamuxTransport()
	transport.KeepAliveInterval = 200 * time.Millisecond
	transport.ConnectionWriteTimeout = 200 * time.Millisecond
	raw := acceptRawStream(t, transport, serverConn, peerConn) // the raw peer reads pings, never answers them
	defer raw.Close()
	session, stream, peer := raw.session, raw.stream, raw.peer
	done := readInBackground(stream, buf, time.Now().Add(50*time.Millisecond))
	time.Sleep(20 * time.Millisecond) // let the reader lend its buffer (either way the Read must end)
	peer.frame(t, 0, 0, frame)
	if _, err := peerConn.Write(make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	select {
	case res := <-done:
		if res.n > 1000 {
			t.Fatalf("Read returned %d bytes, only 1000 were sent", res.n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a Read on a frame stalled mid-payload did not end when keep-alive failed")
	}
	deadline := time.After(5 * time.Second)
	for !session.IsClosed() {
		select {
		case <-deadline:
			t.Fatal("the session with the stalled peer is still open")
		case <-time.After(10 * time.Millisecond):
		}
	}
	if n, err := stream.Read(buf); err == nil {
		t.Fatalf("a Read after the session ended returned %d bytes and no error", n)
	}
}

// A large Write sent from the writer's buffer returns when the connection stops taking bytes: the connection write
// timeout ends the session, and the writer is not left waiting for its frame.
func TestLargeWriteReturnsWhenConnectionStalls(t *testing.T) {
	clientRaw, peerConn := net.Pipe()
	transport := newYamuxTransport()
	transport.ConnectionWriteTimeout = 200 * time.Millisecond
	transport.KeepAliveInterval = time.Minute
	session, err := transport.NewConn(&buffersConn{Conn: clientRaw}, false, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	defer peerConn.Close()
	opened := make(chan network.MuxedStream, 1)
	go func() {
		if s, err := session.OpenStream(context.Background()); err == nil {
			opened <- s
		}
		close(opened)
	}()
	var hdr [12]byte
	if _, err := io.ReadFull(peerConn, hdr[:]); err != nil { // the SYN
		t.Fatal(err)
	}
	stream := <-opened
	if stream == nil {
		t.Fatal("the stream was not opened")
	}
	// the peer grants a large window, then reads nothing more
	binary.BigEndian.PutUint16(hdr[2:4], 2)
	binary.BigEndian.PutUint32(hdr[8:12], 8<<20)
	hdr[1] = 1
	if _, err := peerConn.Write(hdr[:]); err != nil {
		t.Fatal(err)
	}
	written := make(chan error, 1)
	go func() {
		_, err := stream.Write(make([]byte, 4*yamuxFramePayload)) // several frames: one sending, others queued
		written <- err
	}()
	select {
	case err := <-written:
		if err == nil {
			t.Fatal("a write over a connection that takes no bytes succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a large write over a stalled connection never returned")
	}
}

// A peer that announces a data frame larger than the window it was granted is cut off before a byte of the frame is
// read, also when a reader waits with its buffer lent: nothing reaches that buffer and the Read fails.
func TestFrameLargerThanWindowIsRefusedBeforeTheLentBuffer(t *testing.T) {
	buf := make([]byte, 64<<10)
	peerConn, serverRaw := net.Pipe()
	serverConn := &lentReadConn{Conn: serverRaw, target: buf, direct: make(chan struct{}, 1)}
	raw := acceptRawStream(t, newYamuxTransport(), serverConn, peerConn)
	defer raw.Close()
	session, stream, peer := raw.session, raw.stream, raw.peer
	done := readInBackground(stream, buf, time.Time{})
	time.Sleep(20 * time.Millisecond) // let the reader lend its buffer
	peer.frame(t, 0, 0, uint32(newYamuxTransport().InitialStreamWindowSize)+1)
	_, _ = peerConn.Write(make([]byte, 1000)) // fails once the session closed the connection
	select {
	case res := <-done:
		if res.err == nil {
			t.Fatal("a Read on a stream whose peer overran the window succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a peer that overran the window was not cut off")
	}
	select {
	case <-serverConn.direct:
		t.Fatal("bytes of a frame over the window were read into the reader's buffer")
	default:
	}
	if !session.IsClosed() {
		t.Fatal("the session with a peer that overran the window is still open")
	}
}
