package main

// Helpers of the shared-memory pipe stress tests: yamux streams and batched connections as pipeShm sees them, and
// a client that follows hivemind's side of the pipe protocol.

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand"
	"net"
	"sync"
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
