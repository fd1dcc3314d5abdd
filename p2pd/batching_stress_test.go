package main

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"runtime/pprof"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/sec"
	yamuxtransport "github.com/libp2p/go-libp2p/p2p/muxer/yamux"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
)

var errInjectedWrite = errors.New("injected write error")

// faultConn is a raw connection under the batching layer that reads in random short pieces, writes each buffer
// in random pieces (one Write of a net.Conn may take several system calls), and can break: its writes fail after
// failAfter bytes (a partial write and an error), or its reads stall after stallAfter bytes until it is closed (the
// peer's writes then block and time out).
type faultConn struct {
	net.Conn
	mu         sync.Mutex
	rng        *rand.Rand
	failAfter  int64 // <0: never
	stallAfter int64 // <0: never
	written    int64
	read       int64
	closed     chan struct{}
	closeOnce  sync.Once
	peerClosed chan struct{} // closed when the other end is closed
}

func newFaultConn(c net.Conn, seed int64) *faultConn {
	return &faultConn{Conn: c, rng: rand.New(rand.NewSource(seed)), failAfter: -1, stallAfter: -1,
		closed: make(chan struct{})}
}

func (c *faultConn) intn(n int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rng.Intn(n)
}

func (c *faultConn) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1+c.intn(len(p))]
	}
	c.mu.Lock()
	if c.stallAfter >= 0 {
		left := c.stallAfter - c.read
		if left <= 0 {
			c.mu.Unlock()
			select {
			case <-c.closed:
				return 0, net.ErrClosed
			case <-c.peerClosed: // a stalled network still delivers the end of the connection
				return 0, io.EOF
			}
		}
		if int64(len(p)) > left {
			p = p[:left]
		}
	}
	c.mu.Unlock()
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.read += int64(n)
	c.mu.Unlock()
	return n, err
}

func (c *faultConn) Write(p []byte) (int, error) {
	total := 0
	for total < len(p) {
		n := 1 + c.intn(len(p)-total)
		c.mu.Lock()
		var fail bool
		if c.failAfter >= 0 && c.written+int64(n) > c.failAfter {
			n, fail = int(c.failAfter-c.written), true
		}
		c.mu.Unlock()
		m, err := c.Conn.Write(p[total : total+n])
		total += m
		c.mu.Lock()
		c.written += int64(m)
		c.mu.Unlock()
		if err != nil {
			return total, err
		}
		if fail {
			return total, errInjectedWrite
		}
	}
	return total, nil
}

func (c *faultConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// tlsPair secures both ends of a raw connection with p2pd's batching TLS.
func tlsPair(t testing.TB, a, b net.Conn) (sec.SecureConn, sec.SecureConn) {
	t.Helper()
	keyA, _, err := crypto.GenerateEd25519Key(crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	keyB, _, err := crypto.GenerateEd25519Key(crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	idB, err := peer.IDFromPrivateKey(keyB)
	if err != nil {
		t.Fatal(err)
	}
	trA, err := newBatchingTLS(libp2ptls.ID, keyA, nil)
	if err != nil {
		t.Fatal(err)
	}
	trB, err := newBatchingTLS(libp2ptls.ID, keyB, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type result struct {
		conn sec.SecureConn
		err  error
	}
	inbound := make(chan result, 1)
	go func() {
		c, err := trB.SecureInbound(ctx, b, "")
		inbound <- result{c, err}
	}()
	secA, err := trA.SecureOutbound(ctx, a, idB)
	if err != nil {
		t.Fatal(err)
	}
	r := <-inbound
	if r.err != nil {
		t.Fatal(r.err)
	}
	return secA, r.conn
}

type batchFault int

const (
	batchNoFault     batchFault = iota
	batchWriteFails             // a write of the raw connection fails in the middle of a batch
	batchWriteStalls            // the peer stops reading: a write deadline passes in the middle of a batch
	batchFaults
)

func (f batchFault) String() string {
	return [...]string{"no fault", "write fails", "write stalls"}[f]
}

// batchStressOnce runs streams in both directions between two yamux sessions over p2pd's batching TLS, with
// random write and read sizes (large writes are sent from the writer's buffer through WriteBuffers), and the fault.
func batchStressOnce(t *testing.T, seed int64, fault batchFault) error {
	rng := rand.New(rand.NewSource(seed))
	rawA, rawB := net.Pipe()
	faultA, faultB := newFaultConn(rawA, seed+1), newFaultConn(rawB, seed+2)
	faultA.peerClosed, faultB.peerClosed = faultB.closed, faultA.closed
	secA, secB := tlsPair(t, faultA, faultB)
	if _, ok := secA.(interface{ WriteBuffers(...[]byte) (int, error) }); !ok {
		return errors.New("the batching TLS connection offers no WriteBuffers")
	}
	config := *newYamuxTransport()
	if fault == batchWriteStalls {
		config.ConnectionWriteTimeout = 300 * time.Millisecond // else the default: a loaded machine may be slow
	}
	config.EnableKeepAlive = false
	transport := (*yamuxtransport.Transport)(&config)
	sessA, err := transport.NewConn(secA, false, &network.NullScope{})
	if err != nil {
		return err
	}
	defer sessA.Close()
	sessB, err := transport.NewConn(secB, true, &network.NullScope{})
	if err != nil {
		return err
	}
	defer sessB.Close()

	switch fault {
	case batchWriteFails:
		faultA.mu.Lock()
		faultA.failAfter = faultA.written + int64(rng.Intn(1<<20))
		faultA.mu.Unlock()
	case batchWriteStalls:
		faultB.mu.Lock()
		faultB.stallAfter = faultB.read + int64(rng.Intn(1<<20))
		faultB.mu.Unlock()
	}

	streams := 1 + rng.Intn(3)
	type direction struct {
		data      []byte
		got       []byte
		writeErr  error
		readErr   error
		done      chan struct{}
		readDone  chan struct{}
		streamErr error
	}
	var dirs []*direction
	var wg sync.WaitGroup
	for i := 0; i < streams; i++ {
		sA, err := sessA.OpenStream(context.Background())
		if err != nil {
			if fault != batchNoFault {
				break // the connection broke already
			}
			return err
		}
		sB, err := sessB.AcceptStream()
		if err != nil {
			if fault != batchNoFault {
				_ = sA.Reset()
				break
			}
			return err
		}
		for _, pair := range [][2]network.MuxedStream{{sA, sB}, {sB, sA}} {
			w, r := pair[0], pair[1]
			d := &direction{data: randomBytes(rng, rng.Intn(3<<20)), done: make(chan struct{}),
				readDone: make(chan struct{})}
			dirs = append(dirs, d)
			wseed, rseed := rng.Int63(), rng.Int63()
			maxRead := 1 + rng.Intn(1<<20)
			wg.Add(2)
			go func() {
				defer wg.Done()
				defer close(d.done)
				wrng := rand.New(rand.NewSource(wseed))
				data := d.data
				for len(data) > 0 {
					n := 1 + wrng.Intn(len(data))
					if wrng.Intn(2) == 0 && n > 600<<10 {
						n = 1 + wrng.Intn(600<<10)
					}
					if _, err := w.Write(data[:n]); err != nil {
						d.writeErr = err
						_ = w.Reset()
						return
					}
					data = data[n:]
				}
				d.writeErr = w.CloseWrite()
			}()
			go func() {
				defer wg.Done()
				defer close(d.readDone)
				d.got, d.readErr = readWithRandomBuffers(rand.New(rand.NewSource(rseed)), r, maxRead)
				if d.readErr != nil {
					_ = r.Reset()
				}
			}()
		}
	}
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	select {
	case <-finished:
	case <-time.After(20 * time.Second):
		var stacks bytes.Buffer
		_ = pprof.Lookup("goroutine").WriteTo(&stacks, 1)
		return fmt.Errorf("the streams did not finish within 20 s; goroutines:\n%s", stacks.String())
	}
	for i, d := range dirs {
		if !bytes.HasPrefix(d.data, d.got) {
			return fmt.Errorf("direction %d: the reader got %d bytes that are not a prefix of the %d written",
				i, len(d.got), len(d.data))
		}
		if d.readErr == nil && len(d.got) != len(d.data) {
			return fmt.Errorf("direction %d: EOF after %d of %d bytes", i, len(d.got), len(d.data))
		}
		if fault == batchNoFault && (d.writeErr != nil || d.readErr != nil) {
			var all []string
			for _, d := range dirs {
				all = append(all, fmt.Sprintf("write %v, read %v (%d of %d bytes)", d.writeErr, d.readErr,
					len(d.got), len(d.data)))
			}
			return fmt.Errorf("direction %d without a fault: %v; sessions closed: %v %v", i, all,
				sessA.IsClosed(), sessB.IsClosed())
		}
	}
	faultA.mu.Lock()
	faultB.mu.Lock()
	broke := (fault == batchWriteFails && faultA.written >= faultA.failAfter) ||
		(fault == batchWriteStalls && faultB.read >= faultB.stallAfter)
	faultB.mu.Unlock()
	faultA.mu.Unlock()
	if broke {
		// a broken connection ends its sessions
		select {
		case <-waitClosed(sessA):
		case <-time.After(10 * time.Second):
			faultA.mu.Lock()
			defer faultA.mu.Unlock()
			faultB.mu.Lock()
			defer faultB.mu.Unlock()
			return fmt.Errorf("the session whose connection broke is still open (A wrote %d, fails after %d; B read %d, "+
				"stalls after %d)", faultA.written, faultA.failAfter, faultB.read, faultB.stallAfter)
		}
	}
	return nil
}

func waitClosed(s network.MuxedConn) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		for !s.IsClosed() {
			time.Sleep(5 * time.Millisecond)
		}
		close(ch)
	}()
	return ch
}

// stressBudget is how long a time-boxed stress test runs: base, times SHM_STRESS (for long runs by hand).
func stressBudget(base time.Duration) time.Duration {
	if k, err := strconv.Atoi(os.Getenv("SHM_STRESS")); err == nil && k > 0 {
		return base * time.Duration(k)
	}
	return base
}

// TestBatchingTLSStress sends random amounts of bytes through yamux streams over p2pd's batching TLS: random write
// sizes (from 1 byte to beyond a frame; those of 16 KiB or more go out from the writer's buffer through
// WriteBuffers), random read sizes, short reads and writes split into pieces on the raw connection; and breaks
// it: a write error or a write deadline in the middle of a batch. Every stream must end (no writer or reader
// waits forever), every reader must get the bytes in order, and EOF only after the last one.
func TestBatchingTLSStress(t *testing.T) {
	budget := stressBudget(3 * time.Second)
	start := time.Now()
	seed := time.Now().UnixNano()
	iterations := 0
	for i := 0; i == 0 || time.Since(start) < budget; i++ {
		s := seed + int64(i)*104729
		fault := batchFault(i % int(batchFaults))
		t0 := time.Now()
		if err := batchStressOnce(t, s, fault); err != nil {
			t.Fatalf("seed %d, %v: %v", s, fault, err)
		}
		if d := time.Since(t0); d > 2*time.Second {
			t.Logf("seed %d, %v took %v", s, fault, d)
		}
		iterations++
	}
	t.Logf("%d connections", iterations)
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// writeInPieces writes data to w in pieces of random size.
func writeInPieces(rng *rand.Rand, w io.Writer, data []byte) error {
	for len(data) > 0 {
		n := 1 + rng.Intn(len(data))
		if _, err := w.Write(data[:n]); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// readWithRandomBuffers reads r until EOF (nil) or an error, with buffers of random size.
func readWithRandomBuffers(rng *rand.Rand, r io.Reader, max int) ([]byte, error) {
	var got []byte
	for {
		buf := make([]byte, 1+rng.Intn(max))
		n, err := r.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
}
