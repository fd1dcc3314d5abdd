package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

type shmStressScenario int

const (
	shmClean            shmStressScenario = iota // both directions end with EOF, then the client closes its socket
	shmClientLeaves                              // the client writes everything, then closes its socket at once
	shmPeerResets                                // the peer resets the stream at a random moment
	shmClientAborts                              // the client closes its socket at a random moment
	shmClientMisbehaves                          // the client sends a malformed record at a random moment
	shmStressScenarios
)

func (s shmStressScenario) String() string {
	return [...]string{"clean", "client leaves", "peer resets", "client aborts", "client misbehaves"}[s]
}

// shmStressOnce pipes one stream through a pipe of ringSize bytes between a test client and a yamux peer.
func shmStressOnce(seed int64, ringSize int, scenario shmStressScenario) error {
	rng := rand.New(rand.NewSource(seed))
	upLen := rng.Intn(4*ringSize + 2)
	downLen := rng.Intn(4*ringSize + 2)
	if upLen > 3<<20 {
		upLen = rng.Intn(3 << 20)
	}
	if downLen > 3<<20 {
		downLen = rng.Intn(3 << 20)
	}
	if scenario == shmClientLeaves {
		downLen = 0 // the client reads nothing: the peer sends nothing
	}
	upData, downData := randomBytes(rng, upLen), randomBytes(rng, downLen)

	// the network: two yamux sessions over a pipe, through the batching layer with short reads
	rawA, rawB := net.Pipe()
	transport := newYamuxTransport()
	daemonSession, err := transport.NewConn(batchedTestConn(rawA, seed+1), false, &network.NullScope{})
	if err != nil {
		return err
	}
	defer daemonSession.Close()
	peerSession, err := transport.NewConn(batchedTestConn(rawB, seed+2), true, &network.NullScope{})
	if err != nil {
		return err
	}
	defer peerSession.Close()
	daemonStream, err := daemonSession.OpenStream(context.Background()) // its SYN goes out at once
	if err != nil {
		return err
	}
	peerStream, err := peerSession.AcceptStream()
	if err != nil {
		return err
	}

	// the client's socket
	socketFds, err := socketpair()
	if err != nil {
		return err
	}
	daemonConn, clientConn := socketFds[0], socketFds[1]
	defer clientConn.Close()
	mem := make([]byte, 2*ringSize)
	pipe := &shmPipeFile{ringSize: ringSize, mem: mem}
	c := &bufferedConn{Conn: daemonConn, r: bufio.NewReaderSize(daemonConn, 4096)}
	reusable := make(chan bool, 1)
	go func() { reusable <- pipeShm(c, &muxedTestStream{m: daemonStream}, pipe) }()

	client := newShmTestClient(clientConn, mem, ringSize)
	go client.readRecords()

	clientRng, clientReadRng := rand.New(rand.NewSource(seed+3)), rand.New(rand.NewSource(seed+4))
	clientWrote := make(chan error, 1)
	go func() {
		err := client.write(clientRng, upData)
		// without an EOF record, closing the socket (after reading) ends the direction
		if err == nil && scenario != shmClientLeaves && clientRng.Intn(4) != 0 {
			err = client.send(shmRecordEOF, 0)
		}
		if scenario == shmClientLeaves {
			_ = clientConn.Close()
		}
		clientWrote <- err
	}()
	type readResult struct {
		data []byte
		err  error
	}
	clientRead := make(chan readResult, 1)
	go func() {
		got, err := client.read(clientReadRng)
		clientRead <- readResult{got, err}
	}()

	peerRng, peerReadRng := rand.New(rand.NewSource(seed+5)), rand.New(rand.NewSource(seed+6))
	peerWrote := make(chan error, 1)
	go func() {
		err := writeInPieces(peerRng, peerStream, downData)
		if err == nil {
			err = peerStream.CloseWrite()
		}
		peerWrote <- err
	}()
	peerRead := make(chan readResult, 1)
	go func() {
		got, err := readWithRandomBuffers(peerReadRng, peerStream, 1+peerReadRng.Intn(2*ringSize+1))
		peerRead <- readResult{got, err}
	}()

	switch scenario {
	case shmPeerResets:
		time.Sleep(time.Duration(rng.Intn(3000)) * time.Microsecond)
		_ = peerStream.Reset()
	case shmClientAborts:
		time.Sleep(time.Duration(rng.Intn(3000)) * time.Microsecond)
		_ = clientConn.Close()
	case shmClientMisbehaves:
		time.Sleep(time.Duration(rng.Intn(3000)) * time.Microsecond)
		bad := [][2]uint64{{shmRecordAck, uint64(ringSize) + 1}, {shmRecordData, uint64(ringSize) + 1}, {'X', 0},
			{shmRecordData, 0}}[rng.Intn(4)]
		_ = client.send(byte(bad[0]), bad[1])
	}

	timeout := time.After(20 * time.Second)
	wait := func(what string, ch interface{}) (interface{}, error) {
		switch ch := ch.(type) {
		case chan bool:
			select {
			case v := <-ch:
				return v, nil
			case <-timeout:
			}
		case chan error:
			select {
			case v := <-ch:
				return v, nil
			case <-timeout:
			}
		case chan readResult:
			select {
			case v := <-ch:
				return v, nil
			case <-timeout:
			}
		}
		var stacks bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&stacks, 1)
		return nil, fmt.Errorf("%s did not finish within 20 s; goroutines:\n%s", what, stacks.String())
	}

	cw, err := wait("the client's writer", clientWrote)
	if err != nil {
		return err
	}
	cr, err := wait("the client's reader", clientRead)
	if err != nil {
		return err
	}
	if scenario == shmClean || scenario == shmPeerResets || scenario == shmClientMisbehaves {
		_ = clientConn.Close() // done with the stream (or it was aborted)
	}
	pw, err := wait("the peer's writer", peerWrote)
	if err != nil {
		return err
	}
	pr, err := wait("the peer's reader", peerRead)
	if err != nil {
		return err
	}
	ru, err := wait("pipeShm", reusable)
	if err != nil {
		return err
	}
	// the rings may be reused now: nothing of the daemon or of yamux may touch them any more (-race reports it)
	for i := range mem {
		mem[i] = 0xee
	}
	clientErr, _ := cw.(error)
	peerErr, _ := pw.(error)
	clientGot, peerGot := cr.(readResult), pr.(readResult)
	client.mu.Lock()
	violation := client.violation
	client.mu.Unlock()
	if violation != nil {
		return violation
	}
	// whatever happened, each side got a prefix of what the other sent
	if !bytes.HasPrefix(downData, clientGot.data) {
		return fmt.Errorf("the client got %d bytes that are not a prefix of the peer's %d", len(clientGot.data), downLen)
	}
	if !bytes.HasPrefix(upData, peerGot.data) {
		return fmt.Errorf("the peer got %d bytes that are not a prefix of the client's %d", len(peerGot.data), upLen)
	}
	switch scenario {
	case shmClientMisbehaves:
		if ru.(bool) {
			return errors.New("the pipe of a client that sent a malformed record is reused")
		}
	case shmClean:
		if clientErr != nil || clientGot.err != nil || peerErr != nil || peerGot.err != nil {
			return fmt.Errorf("errors in a clean stream: client write %v, client read %v, peer write %v, peer read %v",
				clientErr, clientGot.err, peerErr, peerGot.err)
		}
		if len(clientGot.data) != downLen || len(peerGot.data) != upLen {
			return fmt.Errorf("the client got %d of %d bytes, the peer %d of %d", len(clientGot.data), downLen,
				len(peerGot.data), upLen)
		}
		if !ru.(bool) {
			return errors.New("a stream that ended cleanly left its pipe not reusable")
		}
	case shmClientLeaves:
		if clientErr != nil || peerErr != nil || peerGot.err != nil || len(peerGot.data) != upLen {
			return fmt.Errorf("a client that wrote everything and left: client write %v, peer write %v, peer got %d "+
				"of %d bytes (%v)", clientErr, peerErr, len(peerGot.data), upLen, peerGot.err)
		}
		if !ru.(bool) {
			return errors.New("a stream that ended cleanly left its pipe not reusable")
		}
	}
	return nil
}

func socketpair() ([2]net.Conn, error) {
	var conns [2]net.Conn
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return conns, err
	}
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			return conns, err
		}
	}
	return conns, nil
}

// TestShmPipeStress moves random amounts of bytes in both directions through rings of random (and tiny) sizes, so
// that the ends of the rings are crossed at every position, with clients and peers that read and write in random
// pieces, end cleanly, leave, abort or reset at random moments. Every byte must arrive once and in order, EOF only
// after the last one, pipeShm must return (its goroutines done) and nothing may touch the rings afterwards.
func TestShmPipeStress(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("shared-memory pipes are Linux-only")
	}
	budget := stressBudget(3 * time.Second)
	start := time.Now()
	seed := time.Now().UnixNano()
	iterations := 0
	for i := 0; time.Since(start) < budget; i++ {
		s := seed + int64(i)*7919
		rng := rand.New(rand.NewSource(s))
		var ringSize int
		switch rng.Intn(4) {
		case 0:
			ringSize = 1 + rng.Intn(64)
		case 1:
			ringSize = 1 + rng.Intn(64<<10)
		case 2:
			ringSize = shmMaxForward - 2 + rng.Intn(5)
		default:
			ringSize = 4096 * (1 + rng.Intn(64))
		}
		scenario := shmStressScenario(rng.Intn(int(shmStressScenarios)))
		if err := shmStressOnce(s, ringSize, scenario); err != nil {
			t.Fatalf("seed %d, ring of %d bytes, %v: %v", s, ringSize, scenario, err)
		}
		iterations++
	}
	t.Logf("%d streams", iterations)
}
