package main

// A client that closes its socket (crashes, gives up on a call, or its handler returns) while the peer has not yet
// ended its direction: the daemon must let go of the stream at once, not wait for a peer that may never send
// another byte (each such stream holds two goroutines, a 1 MiB copy buffer and a stream slot of the peer).

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
)

// shortenClientLeftGrace sets clientLeftGrace for the length of a test.
func shortenClientLeftGrace(t *testing.T, grace time.Duration) {
	old := clientLeftGrace.Load()
	clientLeftGrace.Store(int64(grace))
	t.Cleanup(func() { clientLeftGrace.Store(old) })
}

// needsHangUpDetection skips a test where a client's half-close cannot be told from the close of its socket.
func needsHangUpDetection(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the daemon tells a closed client socket from a half-closed one on Linux only")
	}
}

// controlRequest sends one control request on a fresh connection to sock and returns the connection and the
// response.
func controlRequest(t *testing.T, sock string, req []byte) (net.Conn, *bufio.Reader, []byte) {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if err := writeDelimited(conn, req); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := readDelimited(r, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	return conn, r, resp
}

// streamsWith counts the open streams of d with p, all connections together.
func streamsWith(d *daemon, p peer.ID) int {
	n := 0
	for _, c := range d.host.Network().ConnsToPeer(p) {
		n += len(c.GetStreams())
	}
	return n
}

// waitNoStreams waits until d has no stream with p; it fails the test after timeout.
func waitNoStreams(t *testing.T, d *daemon, p peer.ID, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for streamsWith(d, p) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the daemon still holds %d stream(s) with the peer %s after the client closed its socket",
				streamsWith(d, p), timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// registerTestHandler registers a stream handler of d's client for proto at a fresh unix socket and returns its
// listener.
func registerTestHandler(t *testing.T, sock, proto string) net.Listener {
	t.Helper()
	dir, err := os.MkdirTemp("", "p2pd-handler-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	path := filepath.Join(dir, "handler.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	addr, err := ma.NewMultiaddr("/unix" + path)
	if err != nil {
		t.Fatal(err)
	}
	inner := appendStringField(appendBytesField(nil, 1, addr.Bytes()), 2, proto)
	_, _, resp := controlRequest(t, sock, appendBytesField(appendVarintField(nil, 1, reqStreamHandler), 4, inner))
	if !bytes.Equal(resp, encodeOKResponse()) {
		t.Fatalf("STREAM_HANDLER answered %x", resp)
	}
	return l
}

// requestToTestHandler starts two daemons, registers a handler for proto on the first (its listener is l) and has the
// second open a stream to it and write "request" (the stream is reset when the test ends).
func requestToTestHandler(t *testing.T, proto string) (server, remote *daemon, l net.Listener, s network.Stream) {
	server, sock := startUnaryTestDaemon(t)
	remote, _ = startUnaryTestDaemon(t)
	connectDaemons(t, remote, server)
	l = registerTestHandler(t, sock, proto)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := remote.host.NewStream(ctx, server.host.ID(), protocol.ID(proto))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Reset() })
	if _, err := s.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	return server, remote, l, s
}

// acceptHandlerStream accepts the daemon's connection for an inbound stream on the handler's listener l and reads
// its StreamInfo; what follows on r is the peer's data.
func acceptHandlerStream(t *testing.T, l net.Listener) (net.Conn, *bufio.Reader) {
	_ = l.(*net.UnixListener).SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := readDelimited(r, 1<<16); err != nil { // StreamInfo
		t.Fatal(err)
	}
	return conn, r
}

// TestInboundStreamIsReleasedWhenTheHandlerClosesItsSocket: a peer opens a stream to a registered handler, sends a
// request and then neither sends nor closes anything. The handler reads the request and closes its socket (it
// answered, timed out or crashed): the daemon must drop the stream, not wait for the peer forever.
func TestInboundStreamIsReleasedWhenTheHandlerClosesItsSocket(t *testing.T) {
	needsHangUpDetection(t)
	shortenClientLeftGrace(t, time.Second)
	server, remote, l, _ := requestToTestHandler(t, "/test/handler-gone")

	conn, r := acceptHandlerStream(t, l)
	got := make([]byte, len("request"))
	if _, err := io.ReadFull(r, got); err != nil || string(got) != "request" {
		t.Fatalf("the handler got %q, %v", got, err)
	}
	_ = conn.Close() // the handler is done with the stream

	waitNoStreams(t, server, remote.host.ID(), 5*time.Second)
}

// TestOpenedStreamIsReleasedWhenTheClientClosesItsSocket: the client opens a stream, sends its request and closes
// its socket (it gave up on the call); the peer never answers.
func TestOpenedStreamIsReleasedWhenTheClientClosesItsSocket(t *testing.T) {
	needsHangUpDetection(t)
	shortenClientLeftGrace(t, time.Second)
	caller, sock := startUnaryTestDaemon(t)
	remote, _ := startUnaryTestDaemon(t)
	connectDaemons(t, caller, remote)
	const proto = "/test/caller-gone"
	requests := make(chan string, 1)
	remote.host.SetStreamHandler(proto, func(s network.Stream) {
		data, _ := io.ReadAll(s) // the request, then EOF; the answer never comes
		requests <- string(data)
	})

	inner := appendStringField(appendBytesField(nil, 1, []byte(remote.host.ID())), 2, proto)
	conn, _, resp := controlRequest(t, sock, appendBytesField(appendVarintField(nil, 1, reqStreamOpen), 3, inner))
	if fields, err := decodeFields(resp); err != nil || len(fields) == 0 || fields[0].value != respOK {
		t.Fatalf("STREAM_OPEN answered %x", resp)
	}
	if _, err := conn.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close()
	select {
	case got := <-requests:
		if got != "request" {
			t.Fatalf("the peer got %q", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the request did not arrive")
	}

	waitNoStreams(t, caller, remote.host.ID(), 5*time.Second)
}

// TestHalfClosedClientStillGetsTheAnswer: a client that only ends its direction (shutdown SHUT_WR) still reads
// what the peer sends later, and the stream then ends cleanly.
func TestHalfClosedClientStillGetsTheAnswer(t *testing.T) {
	shortenClientLeftGrace(t, 100*time.Millisecond) // shorter than the answer takes: a half-close must not start it
	caller, sock := startUnaryTestDaemon(t)
	remote, _ := startUnaryTestDaemon(t)
	connectDaemons(t, caller, remote)
	const proto = "/test/half-closed"
	remote.host.SetStreamHandler(proto, func(s network.Stream) {
		data, err := io.ReadAll(s)
		if err != nil {
			_ = s.Reset()
			return
		}
		time.Sleep(300 * time.Millisecond) // an answer that takes a while
		_, _ = s.Write(append([]byte("answer to "), data...))
		_ = s.Close()
	})

	inner := appendStringField(appendBytesField(nil, 1, []byte(remote.host.ID())), 2, proto)
	conn, r, resp := controlRequest(t, sock, appendBytesField(appendVarintField(nil, 1, reqStreamOpen), 3, inner))
	if fields, err := decodeFields(resp); err != nil || len(fields) == 0 || fields[0].value != respOK {
		t.Fatalf("STREAM_OPEN answered %x", resp)
	}
	if _, err := conn.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := conn.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	answer, err := io.ReadAll(r)
	if err != nil || string(answer) != "answer to request" {
		t.Fatalf("the half-closed client got %q, %v", answer, err)
	}
	waitNoStreams(t, caller, remote.host.ID(), 5*time.Second)
}

// TestInboundStreamIsReleasedWhenThePeerNeverReads: a peer sends a request and its EOF, then reads nothing of the
// answer. The handler writes until the peer's window and the buffers are full, gives up and closes its socket: the
// daemon must not stay blocked forever on a write to that peer.
func TestInboundStreamIsReleasedWhenThePeerNeverReads(t *testing.T) {
	needsHangUpDetection(t)
	shortenClientLeftGrace(t, time.Second)
	server, remote, l, s := requestToTestHandler(t, "/test/peer-never-reads")
	_ = s.CloseWrite()

	conn, r := acceptHandlerStream(t, l)
	if got, err := io.ReadAll(r); err != nil || string(got) != "request" {
		t.Fatalf("the handler got %q, %v", got, err)
	}
	// an answer larger than the peer's window (16 MiB) and the socket buffers: the handler's write stalls
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	if n, err := conn.Write(make([]byte, 64<<20)); err == nil {
		t.Fatalf("the handler wrote all of its %d bytes to a peer that reads nothing", n)
	}
	_ = conn.Close() // the handler gives up

	waitNoStreams(t, server, remote.host.ID(), 6*time.Second)
}
