package main

import (
	"bufio"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// TestShmPipeEndsWhenTheClientLeavesASilentPeer: a client on a shared-memory pipe sends some bytes and closes its
// socket (no EOF record); the peer reads them and their EOF, and then neither sends nor closes. pipeShm must
// return (releasing the stream and its goroutines) after clientLeftGrace instead of waiting for the peer.
func TestShmPipeEndsWhenTheClientLeavesASilentPeer(t *testing.T) {
	shortenClientLeftGrace(t, time.Second)
	const ringSize = 1 << 16
	rawA, rawB := net.Pipe()
	transport := newYamuxTransport()
	daemonSession, err := transport.NewConn(rawA, false, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer daemonSession.Close()
	peerSession, err := transport.NewConn(rawB, true, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer peerSession.Close()
	daemonStream, err := daemonSession.OpenStream(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	peerStream, err := peerSession.AcceptStream()
	if err != nil {
		t.Fatal(err)
	}
	defer peerStream.Reset()

	conns, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	daemonConn, clientConn := conns[0], conns[1]
	defer clientConn.Close()
	mem := make([]byte, 2*ringSize)
	pipe := &shmPipeFile{ringSize: ringSize, mem: mem}
	c := &bufferedConn{Conn: daemonConn, r: bufio.NewReaderSize(daemonConn, 4096)}
	reusable := make(chan bool, 1)
	go func() { reusable <- pipeShm(c, &muxedTestStream{m: daemonStream}, pipe) }()

	client := newShmTestClient(clientConn, mem, ringSize)
	go client.readRecords()
	copy(mem[:ringSize], "request")
	if err := client.send(shmRecordData, uint64(len("request"))); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len("request"))
	_ = peerStream.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(peerStream, got); err != nil || string(got) != "request" {
		t.Fatalf("the peer got %q, %v", got, err)
	}
	_ = clientConn.Close() // the client leaves; the peer stays silent

	// the peer sees the end of the client's direction
	rest, err := io.ReadAll(peerStream)
	if err != nil || len(rest) != 0 {
		t.Fatalf("the peer read %q, %v after the request", rest, err)
	}
	select {
	case <-reusable:
	case <-time.After(5 * time.Second):
		t.Fatal("pipeShm still waits for a silent peer 5 s after the client closed its socket")
	}
}
