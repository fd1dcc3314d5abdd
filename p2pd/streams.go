package main

import (
	"bufio"
	"io"
	"net"
	"sync"
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

// pipeStream connects a client socket with a libp2p stream in both directions. The end of one direction is
// forwarded as a half-close (EOF on the other side); an error in either direction resets the stream and closes
// the socket, which ends the other direction too.
func pipeStream(c *bufferedConn, s network.Stream) {
	var wg sync.WaitGroup
	var once sync.Once
	abort := func() {
		once.Do(func() {
			_ = s.Reset()
			_ = c.Close()
		})
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := copyStream(s, c); err != nil {
			log.Debugw("stream pipe: client -> peer failed", "error", err)
			abort()
			return
		}
		_ = s.CloseWrite()
	}()
	go func() {
		defer wg.Done()
		if err := copyStream(c, s); err != nil {
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
	if err != nil {
		log.Warnw("cannot reach the stream handler of a client", "protocol", pid, "handler", addr, "error", err)
		_ = s.Reset()
		return
	}
	pipe := d.offerShmPipe(conn, wantsShm)
	d.connectStream(conn, bufio.NewReaderSize(conn, 4096), s, pipe, streamInfoOf(s, pipe))
}

// recoverStream keeps an unexpected panic in a stream handler from taking the daemon down.
func recoverStream(s network.Stream) {
	if r := recover(); r != nil {
		log.Errorw("internal error while handling a stream", "protocol", s.Protocol(), "panic", r)
		_ = s.Reset()
	}
}
