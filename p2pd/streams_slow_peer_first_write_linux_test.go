package main

// The first bytes a client sends on a stream it opened go out with the multistream handshake: go-libp2p negotiates
// lazily once identify told which protocols the peer speaks, and a failed first write leaves that stream unable to
// write for good. A peer that grants go-yamux's default window (256 KiB: daemons with default settings, e.g. the
// original hivemind's) and whose handler starts reading late (a busy machine) makes a first write of more than
// the window wait for window updates longer than a write deadline of the daemon: the request must still arrive
// whole, as it did when writes to the peer had no deadline; plain sockets and shared-memory pipes alike. Whether the
// first bytes go with the handshake depends on which of the pipe's goroutines gets there first (a Read sends the
// handshake alone): the tests let the writing one win, as a busy scheduler may.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"io"
	"math/rand"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// handlerStartDelay is how long the peer's handler waits before it reads: longer than the write deadline the
// daemon sets on writes to a peer (one second), far shorter than any timeout of a call.
const handlerStartDelay = 2500 * time.Millisecond

// lateReaderStream opens a stream from a daemon's host to a peer with go-libp2p's default settings whose handler
// starts reading after handlerStartDelay, then answers with the length and SHA-256 of what it read and closes.
func lateReaderStream(t *testing.T) network.Stream {
	t.Helper()
	caller, _ := startUnaryTestDaemon(t)
	remote, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = remote.Close() })
	const proto = "/test/late-reader"
	remote.SetStreamHandler(proto, func(s network.Stream) {
		time.Sleep(handlerStartDelay)
		data, err := io.ReadAll(s)
		if err != nil {
			_ = s.Reset()
			return
		}
		sum := sha256.Sum256(data)
		answer := binary.BigEndian.AppendUint64(nil, uint64(len(data)))
		_, _ = s.Write(append(answer, sum[:]...))
		_ = s.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := caller.host.Connect(ctx, peer.AddrInfo{ID: remote.ID(), Addrs: remote.Addrs()}); err != nil {
		t.Fatal(err)
	}
	s, err := caller.host.NewStream(ctx, remote.ID(), proto) // negotiated lazily: identify is done
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Reset() })
	return s
}

// writeFirstStream lets Read through only once the first Write returned.
type writeFirstStream struct {
	network.Stream
	once  sync.Once
	wrote chan struct{}
}

func writeFirst(s network.Stream) *writeFirstStream {
	return &writeFirstStream{Stream: s, wrote: make(chan struct{})}
}

func (s *writeFirstStream) Write(b []byte) (int, error) {
	defer s.once.Do(func() { close(s.wrote) })
	return s.Stream.Write(b)
}

func (s *writeFirstStream) Read(b []byte) (int, error) {
	<-s.wrote
	return s.Stream.Read(b)
}

func checkLateReaderAnswer(t *testing.T, answer, request []byte) {
	t.Helper()
	sum := sha256.Sum256(request)
	if len(answer) != 8+sha256.Size || binary.BigEndian.Uint64(answer[:8]) != uint64(len(request)) ||
		!bytes.Equal(answer[8:], sum[:]) {
		t.Fatalf("the peer did not get the %d-byte request whole (answer %x)", len(request), answer)
	}
}

func TestLargeFirstWriteReachesAPeerThatReadsLate(t *testing.T) {
	s := writeFirst(lateReaderStream(t))
	conns, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	daemonConn, clientConn := conns[0], conns[1]
	defer clientConn.Close()
	tuneLocalSocket(daemonConn)
	tuneLocalSocket(clientConn)
	// the request waits in the socket before the pipe starts: its first read takes 1 MiB, 4 times the peer's window
	request := bytes.Repeat([]byte("0123456789abcdef"), copyBufferSize/16)
	if _, err := clientConn.Write(request); err != nil {
		t.Fatal(err)
	}
	if err := clientConn.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pipeStream(&bufferedConn{Conn: daemonConn, r: bufio.NewReaderSize(daemonConn, 4096)}, s)
	}()
	_ = clientConn.SetReadDeadline(time.Now().Add(handlerStartDelay + 5*time.Second))
	answer, err := io.ReadAll(clientConn)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	checkLateReaderAnswer(t, answer, request)
	_ = clientConn.Close()
	waitReturned(t, done, "pipeStream")
}

func TestShmFirstForwardReachesAPeerThatReadsLate(t *testing.T) {
	s := writeFirst(lateReaderStream(t))
	conns, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	daemonConn, clientConn := conns[0], conns[1]
	defer clientConn.Close()
	const ringSize = 1 << 20
	mem := make([]byte, 2*ringSize)
	pipe := &shmPipeFile{ringSize: ringSize, mem: mem}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pipeShm(&bufferedConn{Conn: daemonConn, r: bufio.NewReaderSize(daemonConn, 4096)}, s, pipe)
	}()

	client := newShmTestClient(clientConn, mem, ringSize)
	go client.readRecords()
	// all of the ring at once: the first forward is a full frame, the handshake comes on top of it
	request := bytes.Repeat([]byte("fedcba9876543210"), ringSize/16)
	copy(mem[:ringSize], request)
	client.mu.Lock()
	client.outWritten = ringSize
	client.mu.Unlock()
	if err := client.send(shmRecordData, ringSize); err != nil {
		t.Fatal(err)
	}
	if err := client.send(shmRecordEOF, 0); err != nil {
		t.Fatal(err)
	}
	_ = clientConn.SetReadDeadline(time.Now().Add(handlerStartDelay + 5*time.Second))
	answer, err := client.read(rand.New(rand.NewSource(1)))
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	checkLateReaderAnswer(t, answer, request)
	_ = clientConn.Close()
	waitReturned(t, done, "pipeShm")
}

// waitReturned fails the test unless done is closed within 10 s (the pipe function named what ended).
func waitReturned(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not return after the stream ended", what)
	}
}
