package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

// muxedTestStream makes a bare yamux stream a network.Stream for pipeShm, which uses only its MuxedStream methods.
type muxedTestStream struct {
	network.Stream // nil
	m              network.MuxedStream
}

func (s *muxedTestStream) Read(b []byte) (int, error)  { return s.m.Read(b) }
func (s *muxedTestStream) Write(b []byte) (int, error) { return s.m.Write(b) }
func (s *muxedTestStream) Close() error                { return s.m.Close() }
func (s *muxedTestStream) CloseWrite() error           { return s.m.CloseWrite() }
func (s *muxedTestStream) CloseRead() error            { return s.m.CloseRead() }
func (s *muxedTestStream) Reset() error                { return s.m.Reset() }
func (s *muxedTestStream) SetDeadline(t time.Time) error {
	return s.m.SetDeadline(t)
}
func (s *muxedTestStream) SetReadDeadline(t time.Time) error  { return s.m.SetReadDeadline(t) }
func (s *muxedTestStream) SetWriteDeadline(t time.Time) error { return s.m.SetWriteDeadline(t) }

// shortReadConn hands out at most a random number of bytes per Read (as a TCP socket may), so that frames and TLS
// records arrive in pieces.
type shortReadConn struct {
	net.Conn
	mu  sync.Mutex
	rng *rand.Rand
}

func (c *shortReadConn) Read(p []byte) (int, error) {
	if len(p) > 1 {
		c.mu.Lock()
		n := 1 + c.rng.Intn(len(p))
		c.mu.Unlock()
		p = p[:n]
	}
	return c.Conn.Read(p)
}

// batchedTestConn is one end of a connection as p2pd's yamux sees it: short reads underneath, the batching layer,
// and WriteBuffers.
func batchedTestConn(raw net.Conn, seed int64) net.Conn {
	bc := newBatchConn(&shortReadConn{Conn: raw, rng: rand.New(rand.NewSource(seed))})
	return &batchedSecureConnForTest{raw: bc}
}

// batchedSecureConnForTest is batchedSecureConn over a security layer that changes nothing.
type batchedSecureConnForTest struct {
	raw *batchConn
}

func (c *batchedSecureConnForTest) secured() *batchedSecureConn {
	return &batchedSecureConn{SecureConn: &plainSecureConn{raw: c.raw}, raw: c.raw}
}

func (c *batchedSecureConnForTest) Read(p []byte) (int, error)  { return c.raw.Read(p) }
func (c *batchedSecureConnForTest) Write(p []byte) (int, error) { return c.secured().Write(p) }
func (c *batchedSecureConnForTest) WriteBuffers(bufs ...[]byte) (int, error) {
	return c.secured().WriteBuffers(bufs...)
}
func (c *batchedSecureConnForTest) Close() error                  { return c.raw.Close() }
func (c *batchedSecureConnForTest) LocalAddr() net.Addr           { return c.raw.LocalAddr() }
func (c *batchedSecureConnForTest) RemoteAddr() net.Addr          { return c.raw.RemoteAddr() }
func (c *batchedSecureConnForTest) SetDeadline(t time.Time) error { return c.raw.SetDeadline(t) }
func (c *batchedSecureConnForTest) SetReadDeadline(t time.Time) error {
	return c.raw.SetReadDeadline(t)
}
func (c *batchedSecureConnForTest) SetWriteDeadline(t time.Time) error {
	return c.raw.SetWriteDeadline(t)
}

// shmTestClient follows the client's side of the shared-memory pipe protocol as hivemind's ShmPipeTransport does
// (p2p_daemon_bindings/shm_pipe.py), and checks every record the daemon sends.
type shmTestClient struct {
	conn    net.Conn
	out, in []byte // client -> daemon ring, daemon -> client ring
	size    uint64

	writeMu sync.Mutex

	mu                      sync.Mutex
	changed                 *sync.Cond
	outWritten, outAcked    uint64
	inAnnounced, inConsumed uint64
	inEnded                 bool
	lost                    error // the socket ended (io.EOF or an error)
	violation               error
}

func newShmTestClient(conn net.Conn, mem []byte, size int) *shmTestClient {
	c := &shmTestClient{conn: conn, out: mem[:size], in: mem[size : 2*size], size: uint64(size)}
	c.changed = sync.NewCond(&c.mu)
	return c
}

func (c *shmTestClient) readRecords() {
	r := bufio.NewReaderSize(c.conn, 16) // records arrive in pieces too
	var record [shmRecordLen]byte
	for {
		_, err := io.ReadFull(r, record[:])
		c.mu.Lock()
		if err != nil {
			c.lost = err
			c.changed.Broadcast()
			c.mu.Unlock()
			return
		}
		kind, n := record[0], binary.LittleEndian.Uint64(record[1:])
		switch {
		case kind == shmRecordAck && n > 0 && n <= c.outWritten-c.outAcked:
			c.outAcked += n
		case kind == shmRecordData && !c.inEnded && n > 0 && n <= c.size-(c.inAnnounced-c.inConsumed):
			c.inAnnounced += n
		case kind == shmRecordEOF && !c.inEnded && n == 0:
			c.inEnded = true
		default:
			if c.violation == nil {
				c.violation = fmt.Errorf("the daemon sent %q %d (written %d, acked %d, announced %d, consumed %d, "+
					"ended %v)", kind, n, c.outWritten, c.outAcked, c.inAnnounced, c.inConsumed, c.inEnded)
			}
		}
		c.changed.Broadcast()
		c.mu.Unlock()
	}
}

func (c *shmTestClient) send(kind byte, n uint64) error {
	var record [shmRecordLen]byte
	record[0] = kind
	binary.LittleEndian.PutUint64(record[1:], n)
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	_, err := c.conn.Write(record[:])
	return err
}

// write puts data into the out ring in pieces of random size, announcing each piece, as space becomes free.
func (c *shmTestClient) write(rng *rand.Rand, data []byte) error {
	for len(data) > 0 {
		c.mu.Lock()
		for c.outWritten-c.outAcked == c.size && c.lost == nil {
			c.changed.Wait()
		}
		free, lost := c.size-(c.outWritten-c.outAcked), c.lost
		start := c.outWritten % c.size
		c.mu.Unlock()
		if lost != nil {
			return lost
		}
		n := minUint64(uint64(len(data)), free)
		if rng.Intn(2) == 0 {
			n = 1 + uint64(rng.Int63n(int64(n)))
		}
		// one or two copies (wrapping around), one record
		first := minUint64(n, c.size-start)
		copy(c.out[start:start+first], data[:first])
		copy(c.out[:n-first], data[first:n])
		c.mu.Lock()
		c.outWritten += n
		c.mu.Unlock()
		if err := c.send(shmRecordData, n); err != nil {
			return err
		}
		data = data[n:]
		if rng.Intn(8) == 0 {
			time.Sleep(time.Duration(rng.Intn(200)) * time.Microsecond)
		}
	}
	return nil
}

// read consumes announced bytes in pieces of random size and acknowledges them, until the daemon's EOF record
// (nil) or the end of the socket.
func (c *shmTestClient) read(rng *rand.Rand) ([]byte, error) {
	var got []byte
	for {
		c.mu.Lock()
		for c.inAnnounced == c.inConsumed && !c.inEnded && c.lost == nil && c.violation == nil {
			c.changed.Wait()
		}
		avail, ended, lost, violation := c.inAnnounced-c.inConsumed, c.inEnded, c.lost, c.violation
		start := c.inConsumed % c.size
		c.mu.Unlock()
		if violation != nil {
			return got, violation
		}
		if avail == 0 {
			if ended {
				return got, nil
			}
			return got, lost
		}
		n := avail
		if rng.Intn(2) == 0 {
			n = 1 + uint64(rng.Int63n(int64(n)))
		}
		first := minUint64(n, c.size-start)
		got = append(got, c.in[start:start+first]...)
		got = append(got, c.in[:n-first]...)
		c.mu.Lock()
		c.inConsumed += n
		c.mu.Unlock()
		if err := c.send(shmRecordAck, n); err != nil {
			return got, err
		}
		if rng.Intn(8) == 0 {
			time.Sleep(time.Duration(rng.Intn(300)) * time.Microsecond)
		}
	}
}

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
	budget := 3 * time.Second
	if k, err := strconv.Atoi(os.Getenv("SHM_STRESS")); err == nil && k > 0 {
		budget *= time.Duration(k)
	}
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

// TestShmPipesThroughConnectStreamAreReused runs streams of one yamux session through connectStream with pipe
// files of a real pool, several at once: the client maps each offered file (keeping its mappings, as the Python
// client does), takes or declines it at random, moves random bytes both ways and closes. Every byte must arrive
// in order, the files of cleanly ended streams must be offered again, and no more files may be left than the
// pool keeps.
func TestShmPipesThroughConnectStreamAreReused(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("shared-memory pipes are Linux-only")
	}
	dir := mountSmallTmpfs(t, 200)
	d := &daemon{pipes: shmPipePool{dir: dir}}
	defer d.pipes.close()
	seed := time.Now().UnixNano()
	rng := rand.New(rand.NewSource(seed))
	rawA, rawB := net.Pipe()
	transport := newYamuxTransport()
	daemonSession, err := transport.NewConn(batchedTestConn(rawA, seed+1), false, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer daemonSession.Close()
	peerSession, err := transport.NewConn(batchedTestConn(rawB, seed+2), true, &network.NullScope{})
	if err != nil {
		t.Fatal(err)
	}
	defer peerSession.Close()

	var mappingsMu sync.Mutex
	mappings := map[string][]byte{} // the client's mappings, by path
	defer func() {
		for _, mem := range mappings {
			_ = syscall.Munmap(mem)
		}
	}()
	mapFile := func(path string) ([]byte, error) {
		mappingsMu.Lock()
		defer mappingsMu.Unlock()
		if mem, ok := mappings[path]; ok {
			delete(mappings, path) // in use by one stream at a time
			return mem, nil
		}
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return syscall.Mmap(int(f.Fd()), 0, 2*shmRingSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	}
	keepMapping := func(path string, mem []byte) {
		mappingsMu.Lock()
		defer mappingsMu.Unlock()
		mappings[path] = mem
		for path, mem := range mappings {
			if _, err := os.Stat(path); os.IsNotExist(err) { // the daemon dropped it: its memory goes when unmapped
				_ = syscall.Munmap(mem)
				delete(mappings, path)
			}
		}
	}

	offered := map[string]int{}
	var offeredMu, openMu sync.Mutex
	runStream := func(seed int64) error {
		rng := rand.New(rand.NewSource(seed))
		upData, downData := randomBytes(rng, rng.Intn(3*shmRingSize)), randomBytes(rng, rng.Intn(3*shmRingSize))
		openMu.Lock() // streams opened at once may be accepted in another order
		daemonStream, err := daemonSession.OpenStream(context.Background())
		if err != nil {
			openMu.Unlock()
			return err
		}
		peerStream, err := peerSession.AcceptStream()
		openMu.Unlock()
		if err != nil {
			return err
		}
		conns, err := socketpair()
		if err != nil {
			return err
		}
		daemonConn, clientConn := conns[0], conns[1]
		defer clientConn.Close()
		pipe := d.offerShmPipe(daemonConn, true)
		if pipe == nil {
			return errors.New("no pipe offered")
		}
		connected := make(chan struct{})
		go func() {
			defer close(connected)
			d.connectStream(daemonConn, bufio.NewReader(daemonConn), &muxedTestStream{m: daemonStream}, pipe,
				[]byte(pipe.path))
		}()
		clientReader := bufio.NewReader(clientConn)
		info, err := readDelimited(clientReader, 1<<10)
		if err != nil {
			return err
		}
		path := string(info)
		offeredMu.Lock()
		offered[path]++
		offeredMu.Unlock()
		peerDone := make(chan error, 1)
		go func() {
			werr := make(chan error, 1)
			go func() {
				err := writeInPieces(rand.New(rand.NewSource(seed+3)), peerStream, downData)
				if err == nil {
					err = peerStream.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(peerStream)
			if err == nil && !bytes.Equal(got, upData) {
				err = fmt.Errorf("the peer got %d bytes, not the %d the client sent", len(got), len(upData))
			}
			if e := <-werr; err == nil {
				err = e
			}
			peerDone <- err
		}()
		var clientErr error
		if rng.Intn(4) == 0 {
			// plain socket bytes
			if _, err := clientConn.Write([]byte{shmDecline}); err != nil {
				return err
			}
			werr := make(chan error, 1)
			go func() {
				err := writeInPieces(rand.New(rand.NewSource(seed+1)), clientConn, upData)
				if err == nil {
					err = clientConn.(*net.UnixConn).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(clientReader)
			if err == nil && !bytes.Equal(got, downData) {
				err = fmt.Errorf("the client got %d bytes over its socket, not the %d the peer sent", len(got),
					len(downData))
			}
			if e := <-werr; err == nil {
				err = e
			}
			clientErr = err
			_ = clientConn.Close()
		} else {
			mem, err := mapFile(path)
			if err != nil {
				return err
			}
			if _, err := clientConn.Write([]byte{shmAccept}); err != nil {
				return err
			}
			client := newShmTestClient(clientConn, mem, shmRingSize)
			go client.readRecords()
			werr := make(chan error, 1)
			go func() {
				err := client.write(rand.New(rand.NewSource(seed+1)), upData)
				if err == nil {
					err = client.send(shmRecordEOF, 0)
				}
				werr <- err
			}()
			got, err := client.read(rand.New(rand.NewSource(seed + 2)))
			if err == nil && !bytes.Equal(got, downData) {
				err = fmt.Errorf("the client got %d bytes through the pipe, not the %d the peer sent", len(got),
					len(downData))
			}
			if e := <-werr; err == nil {
				err = e
			}
			clientErr = err
			_ = clientConn.Close()
			keepMapping(path, mem)
		}
		select {
		case err := <-peerDone:
			if err != nil {
				return err
			}
		case <-time.After(20 * time.Second):
			return errors.New("the peer's side did not finish")
		}
		select {
		case <-connected:
		case <-time.After(20 * time.Second):
			return errors.New("connectStream did not return")
		}
		return clientErr
	}

	start := time.Now()
	streams := 0
	for round := 0; time.Since(start) < 3*time.Second; round++ {
		parallel := 1 + rng.Intn(6)
		errs := make(chan error, parallel)
		for i := 0; i < parallel; i++ {
			s := rng.Int63()
			go func() {
				if err := runStream(s); err != nil {
					errs <- fmt.Errorf("seed %d: %w", s, err)
					return
				}
				errs <- nil
			}()
		}
		for i := 0; i < parallel; i++ {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		streams += parallel
	}
	if len(offered) >= streams {
		t.Fatalf("%d streams were offered %d different pipe files: none was reused", streams, len(offered))
	}
	if names := filesIn(t, dir); len(names) > shmIdlePipes {
		t.Fatalf("%d pipe files are left, the pool keeps %d", len(names), shmIdlePipes)
	}
	t.Logf("%d streams, %d pipe files", streams, len(offered))
}
