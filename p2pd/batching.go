package main

// Fewer system calls under the security layer.
//
// TLS writes one system call per record (at most 16 KiB) and Noise one per message (at most 64 KiB), and both read
// the TCP socket in similarly small pieces. At GB/s rates these system calls cost more CPU than the encryption.
// batchingSecurity wraps a security transport so that the raw connection underneath (1) reads through a buffer
// and (2) collects all records produced by one Write of the secured connection into one system call. Bytes on
// the wire are unchanged: only how they are handed to the kernel differs.

import (
	"bufio"
	"context"
	"net"
	"sync"
	"sync/atomic"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/core/sec"
	tptu "github.com/libp2p/go-libp2p/p2p/net/upgrader"
	noise "github.com/libp2p/go-libp2p/p2p/security/noise"
	libp2ptls "github.com/libp2p/go-libp2p/p2p/security/tls"
)

const (
	rawReadBufferSize = 256 << 10 // read buffer under the security layer, once the connection carries bulk data
	// initialReadBufferSize is the read buffer until then: a connection still in its handshake (anyone can open up
	// to the transient limit of them) or carrying only small messages does not hold 256 KiB
	initialReadBufferSize = 16 << 10
	maxWriteBatch         = 256 << 10 // flush a write batch when it reaches this size
)

var writeBatchBuffers = sync.Pool{New: func() interface{} { b := make([]byte, 0, maxWriteBatch+64<<10); return &b }}

// newBatchingTLS and newBatchingNoise are libp2p.Security constructors.
func newBatchingTLS(id protocol.ID, key crypto.PrivKey, muxers []tptu.StreamMuxer) (sec.SecureTransport, error) {
	inner, err := libp2ptls.New(id, key, muxers)
	if err != nil {
		return nil, err
	}
	return &batchingSecurity{inner: inner}, nil
}

func newBatchingNoise(id protocol.ID, key crypto.PrivKey, muxers []tptu.StreamMuxer) (sec.SecureTransport, error) {
	inner, err := noise.New(id, key, muxers)
	if err != nil {
		return nil, err
	}
	return &batchingSecurity{inner: inner}, nil
}

type batchingSecurity struct {
	inner sec.SecureTransport
}

func (b *batchingSecurity) ID() protocol.ID { return b.inner.ID() }

func (b *batchingSecurity) SecureInbound(ctx context.Context, c net.Conn, p peer.ID) (sec.SecureConn, error) {
	raw := newBatchConn(c)
	secured, err := b.inner.SecureInbound(ctx, raw, p)
	if err != nil {
		return nil, err
	}
	return &batchedSecureConn{SecureConn: secured, raw: raw}, nil
}

func (b *batchingSecurity) SecureOutbound(ctx context.Context, c net.Conn, p peer.ID) (sec.SecureConn, error) {
	raw := newBatchConn(c)
	secured, err := b.inner.SecureOutbound(ctx, raw, p)
	if err != nil {
		return nil, err
	}
	return &batchedSecureConn{SecureConn: secured, raw: raw}, nil
}

// batchedSecureConn makes each of its Writes one batch on the raw connection.
type batchedSecureConn struct {
	sec.SecureConn
	raw *batchConn
}

func (c *batchedSecureConn) Write(p []byte) (int, error) {
	c.raw.beginBatch()
	n, err := c.SecureConn.Write(p)
	if ferr := c.raw.endBatch(); err == nil {
		err = ferr
	}
	return n, err
}

// WriteBuffers writes bufs with one Write of the secured connection each, all in one batch on the raw connection.
// The patched go-yamux (third_party/go-yamux) sends a frame's header and payload this way, so that it needs no
// copy of the payload; the header then travels in a TLS record of its own, which peers decrypt like any other.
func (c *batchedSecureConn) WriteBuffers(bufs ...[]byte) (int, error) {
	c.raw.beginBatch()
	total := 0
	var err error
	for _, b := range bufs {
		var n int
		n, err = c.SecureConn.Write(b)
		total += n
		if err != nil {
			break
		}
	}
	if ferr := c.raw.endBatch(); err == nil {
		err = ferr
	}
	return total, err
}

// Close breaks a write batch in flight instead of waiting for it. crypto/tls does so with a Write of its own in
// flight (it sends no close_notify then), but a batch reaches the socket only after the secured connection's Write
// returned: TLS saw no write in flight and sent its close_notify behind the batch, which waited up to the 5 s TLS
// gives the alert when the peer read nothing (every yamux session closed over a stalled connection took 5 s).
func (c *batchedSecureConn) Close() error {
	c.raw.closing.Store(true) // a batch that begins from now on breaks the connection itself (beginBatch)
	if c.raw.inFlight.Load() > 0 {
		err := c.raw.Conn.Close()
		_ = c.SecureConn.Close() // fails to send close_notify, as TLS skips it with a Write in flight
		return err
	}
	return c.SecureConn.Close()
}

// batchConn is the raw connection under the security layer: buffered reads, and writes that are collected
// while a batch is open. Writes outside a batch (handshake, alerts) go straight to the socket, after any
// pending batched bytes, so the order of bytes is always preserved. Every batch is flushed before the Write
// of the secured connection returns, so Close has nothing to flush.
type batchConn struct {
	net.Conn
	reader *bufio.Reader

	growReader bool // the last fill of the small read buffer filled it: the next fill uses a large one
	grown      bool // the read buffer is the large one

	mu      sync.Mutex
	batches int     // open batches
	pending *[]byte // collected bytes; nil when there are none
	err     error   // first write error: later writes fail with it

	inFlight atomic.Int32 // batches begun and not yet flushed (read by batchedSecureConn.Close without the lock)
	closing  atomic.Bool  // batchedSecureConn.Close was called
}

func newBatchConn(c net.Conn) *batchConn {
	return &batchConn{Conn: c, reader: bufio.NewReaderSize(c, initialReadBufferSize)}
}

// Read reads through the buffer, which starts small and becomes rawReadBufferSize once a read filled the small one
// (bulk data). The security layers call Read from one goroutine at a time (under their read locks), so the reader
// is replaced without a lock, and only when it holds no bytes.
func (c *batchConn) Read(p []byte) (int, error) {
	empty := c.reader.Buffered() == 0
	if empty && c.growReader {
		c.reader, c.growReader, c.grown = bufio.NewReaderSize(c.Conn, rawReadBufferSize), false, true
	}
	n, err := c.reader.Read(p)
	if empty && !c.grown && n+c.reader.Buffered() >= initialReadBufferSize {
		c.growReader = true
	}
	return n, err
}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if c.batches == 0 {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		n, err := c.Conn.Write(p)
		if err != nil {
			c.err = err
		}
		return n, err
	}
	if c.pending == nil {
		c.pending = writeBatchBuffers.Get().(*[]byte)
	}
	*c.pending = append(*c.pending, p...)
	if len(*c.pending) >= maxWriteBatch {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (c *batchConn) flushLocked() error {
	if c.pending == nil {
		return nil
	}
	buf := c.pending
	c.pending = nil
	_, err := c.Conn.Write(*buf)
	*buf = (*buf)[:0]
	if cap(*buf) <= maxWriteBatch+64<<10 {
		writeBatchBuffers.Put(buf)
	}
	if err != nil {
		c.err = err
	}
	return err
}

func (c *batchConn) beginBatch() {
	c.inFlight.Add(1)
	if c.closing.Load() {
		_ = c.Conn.Close() // the connection is being closed: its close_notify must not wait behind this batch
	}
	c.mu.Lock()
	c.batches++
	c.mu.Unlock()
}

func (c *batchConn) endBatch() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.inFlight.Add(-1) // after the flush
	c.batches--
	if c.batches > 0 {
		return nil
	}
	return c.flushLocked()
}
