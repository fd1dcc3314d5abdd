package main

import (
	"bufio"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	ma "github.com/multiformats/go-multiaddr"
)

// copyBufferSize is the size of the buffers that move stream bytes between a client socket and a libp2p
// stream: large reads and writes on the local socket keep the syscall count low at GB/s rates. A full buffer
// fills whole yamux frames.
const copyBufferSize = 4 * yamuxFramePayload

var copyBuffers = sync.Pool{New: func() interface{} { b := make([]byte, copyBufferSize); return &b }}

// bufferedConn is a control connection whose first bytes may already sit in a bufio.Reader.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

type halfCloser interface{ CloseWrite() error }

func (c *bufferedConn) CloseWrite() error {
	if hc, ok := c.Conn.(halfCloser); ok {
		return hc.CloseWrite()
	}
	return c.Conn.Close()
}

// copyStream moves bytes from src to dst until src reports EOF (nil is returned) or an error happens.
func copyStream(dst io.Writer, src io.Reader) error {
	bufp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bufp)
	buf := *bufp
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// peerStallCheck is how often a write to a peer that takes no bytes looks whether the client is done (writeToPeer).
const peerStallCheck = time.Second

var errPeerStalled = errors.New("the peer took no bytes for clientLeftGrace after the client was done")

// writeToPeer writes b to s. While the peer takes nothing (its window stays closed), it asks clientDone every
// peerStallCheck whether the client is done with the stream; once the peer took nothing for clientLeftGrace after
// that, it gives up: a peer that never reads would otherwise hold the stream, and what the client sent, forever.
// It leaves a write deadline on s (the caller clears it once done writing).
func writeToPeer(s network.Stream, b []byte, clientDone func() bool) error {
	var stalledSince time.Time
	for len(b) > 0 {
		started := time.Now()
		_ = s.SetWriteDeadline(started.Add(peerStallCheck))
		n, err := s.Write(b)
		b = b[n:]
		if err == nil {
			break
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return err
		}
		if n == 0 && time.Since(started) < peerStallCheck/2 {
			return err // a timeout that did not wait for its deadline stays (see sendHandshake): no busy loop
		}
		switch {
		case n > 0 || !clientDone():
			stalledSince = time.Time{}
		case stalledSince.IsZero():
			stalledSince = time.Now()
		case time.Since(stalledSince) >= time.Duration(clientLeftGrace.Load()):
			return errPeerStalled
		}
	}
	return nil
}

// sendHandshake sends what a stream opened here still owes of its protocol negotiation, without a deadline, before
// writeToPeer sets one: go-libp2p negotiates lazily, sending the handshake with the first bytes written, and a first
// write that times out part way leaves the stream unable to write for good (every later Write fails at once, the
// same timeout; writeToPeer would retry it in a busy loop). An empty write sends the handshake alone; on other
// streams it does nothing.
func sendHandshake(s network.Stream) error {
	_, err := s.Write(nil)
	return err
}

// copyToPeer moves bytes from the client to the peer like copyStream, through writeToPeer.
func copyToPeer(s network.Stream, c io.Reader, clientDone func() bool) error {
	if err := sendHandshake(s); err != nil {
		return err
	}
	bufp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bufp)
	buf := *bufp
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if werr := writeToPeer(s, buf[:n], clientDone); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return s.SetWriteDeadline(time.Time{})
		}
		if err != nil {
			return err
		}
	}
}

// clientLeftGrace is how long the peer's direction of a stream may still go on, unread, after the client closed its
// whole socket: a peer that sends something in that time finds the stream reset (the bytes cannot be delivered),
// as one that sends nothing does at its end; one that ends its direction closes it cleanly. Until then, what the
// client sent last is not overtaken by a reset. It is also how long a peer may take no bytes at all of what the client
// sent before it left (writeToPeer): long enough for an honest peer whose own client pauses while its window is full
// (a busy machine), short enough that a peer cannot hold streams for good. (In nanoseconds; tests shorten it.)
var clientLeftGrace atomic.Int64

func init() { clientLeftGrace.Store(int64(15 * time.Second)) }

// pipeStream connects a client socket with a libp2p stream in both directions. The end of one direction is
// forwarded as a half-close (EOF on the other side); an error in either direction resets the stream and closes
// the socket, which ends the other direction too. A client that closes its whole socket after its EOF (it crashed,
// gave up on the call, or its handler returned) reads nothing more: the peer then has clientLeftGrace to end its
// direction, instead of the daemon waiting for a peer that may never send another byte.
func pipeStream(c *bufferedConn, s network.Stream) {
	var wg sync.WaitGroup
	var once sync.Once
	abort := func() {
		once.Do(func() {
			_ = s.Reset()
			_ = c.Close()
		})
	}
	var mu sync.Mutex
	var upEnded, downEnded bool
	downHasEnded := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return downEnded
	}
	// the client is done once it closed its socket, or shut down its writing half after it got the peer's EOF
	clientDone := func() bool {
		readEnded, hungUp := pollShutdown(c.Conn)
		if downHasEnded() {
			return readEnded
		}
		return hungUp
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := copyToPeer(s, c, clientDone); err != nil {
			log.Debugw("stream pipe: client -> peer failed", "error", err)
			abort()
			return
		}
		_ = s.CloseWrite()
		mu.Lock()
		upEnded = true
		mu.Unlock()
		if awaitHangUp(c.Conn, downHasEnded) {
			log.Debugw("stream pipe: the client closed its socket before the peer's end", "protocol", s.Protocol())
			_ = s.SetReadDeadline(time.Now().Add(time.Duration(clientLeftGrace.Load())))
		}
	}()
	go func() {
		defer wg.Done()
		err := copyStream(c, s)
		mu.Lock()
		downEnded = true
		wake := upEnded
		mu.Unlock()
		if wake {
			_ = c.Conn.SetReadDeadline(time.Now()) // ends awaitHangUp: nothing reads the socket any more
		}
		if err != nil {
			log.Debugw("stream pipe: peer -> client failed", "error", err)
			abort()
			return
		}
		_ = c.CloseWrite()
	}()
	wg.Wait()
	_ = c.Close()
	_ = s.Close()
}

// handleIncomingStream hands a stream opened by a remote peer to the next registered client: it dials the
// client's callback address, sends StreamInfo and pipes the bytes.
func (d *daemon) handleIncomingStream(s network.Stream) {
	defer recoverStream(s)
	pid := s.Protocol()
	for {
		d.mu.Lock()
		handlers, ok := d.streamHandlers[pid]
		var key string
		if ok && handlers.len() > 0 {
			key = handlers.pick()
		}
		wantsShm := d.shmClients[key]
		d.mu.Unlock()
		if key == "" {
			log.Debugw("incoming stream for a protocol without handler", "protocol", pid)
			_ = s.Reset()
			return
		}
		addr, err := ma.NewMultiaddrBytes([]byte(key))
		if err != nil {
			_ = s.Reset()
			return
		}
		conn, err := dialClient(addr, 10*time.Second)
		if err != nil && clientGone(err) {
			// the client went away without removing its handlers: forget them, and try the next client (if any)
			log.Infow("forgetting the stream handlers of a client that is gone", "handler", addr, "error", err)
			d.mu.Lock()
			d.forgetStreamClient(key)
			d.mu.Unlock()
			continue
		}
		if err != nil {
			log.Warnw("cannot reach the stream handler of a client", "protocol", pid, "handler", addr, "error", err)
			_ = s.Reset()
			return
		}
		pipe := d.offerShmPipe(conn, wantsShm)
		d.connectStream(conn, bufio.NewReaderSize(conn, 4096), s, pipe, streamInfoOf(s, pipe))
		return
	}
}

// recoverStream keeps an unexpected panic in a stream handler from taking the daemon down.
func recoverStream(s network.Stream) {
	if r := recover(); r != nil {
		log.Errorw("internal error while handling a stream", "protocol", s.Protocol(), "panic", r)
		_ = s.Reset()
	}
}
