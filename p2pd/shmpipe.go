package main

// Shared-memory stream pipes: a hivemind extension of the control protocol between a client and this daemon.
//
// Without it, every stream byte crosses a unix socket between the client and the daemon: two kernel copies per
// direction and system calls for every chunk. A client that sets `shm_capable` (field 100) in StreamOpenRequest or
// StreamHandlerRequest is offered a pipe file in /dev/shm ($HIVEMIND_P2P_SHM_DIR) with the StreamInfo of each of its streams (field 100:
// path, field 101: ring size). It maps the file and answers with one byte: 'S' to use the pipe, 'P' to keep plain
// socket bytes. The daemon sends nothing more on the socket until it has the answer.
// Clients and daemons that do not know the extension ignore the unknown fields and keep plain stream sockets.
//
// In shared-memory mode the file holds two rings of ring-size bytes (client -> daemon, then daemon -> client) and
// the socket carries only 9-byte records, a type byte and a little-endian uint64:
//
//	'D' n  the sender put n more bytes into its ring, right after the previous ones (wrapping around)
//	'A' n  the receiver is done with n more bytes of the sender's ring: the sender may reuse that space
//	'E' 0  the sender's direction ended (a half-close)
//
// A sender never has more than ring-size unacknowledged bytes. Closing the socket ends the stream as closing a plain
// stream socket does. A malformed record aborts the stream.
//
// Fresh shared memory is expensive to touch (a page fault per page in each process), so pipe files are reused: when
// the client closed the socket of a stream that ended cleanly, it no longer touches the rings and the daemon keeps
// the file for a later stream; clients keep their mappings of idle pipes too. The daemon removes its files when it
// exits (the client that started it removes them if it was killed).
//
// Every page of a pipe file is reserved when it is created: touching a tmpfs page that cannot be backed raises
// SIGBUS in the daemon and in the client. When the space is not there, or a new file would leave less than half
// of the filesystem free (containers give /dev/shm 64 MiB, which DataLoader workers need too), no pipe is offered
// and the stream keeps its socket.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
)

const (
	fieldShmCapable  = 100 // StreamOpenRequest / StreamHandlerRequest: bool
	fieldShmPath     = 100 // StreamInfo: string
	fieldShmRingSize = 101 // StreamInfo: uint64

	shmRingSize  = 4 << 20
	shmIdlePipes = 4 // pipe files kept for reuse (each one up to 2 * shmRingSize of memory)
	// shmMaxPipes bounds the pipe files of a daemon, in use or idle: each one holds 2 * shmRingSize of memory from
	// its creation on (every page is reserved), and every stream that remote peers open to a handler of a client
	// gets one. Streams beyond it keep their sockets.
	shmMaxPipes      = 32
	shmMaxForward    = yamuxFramePayload // bytes forwarded to the stream (one frame) before they are acknowledged
	shmRecordLen     = 9
	shmAnswerTimeout = 60 * time.Second // a busy client event loop may take a while to answer an offer

	shmRecordData = 'D'
	shmRecordAck  = 'A'
	shmRecordEOF  = 'E'
	shmAccept     = 'S'
	shmDecline    = 'P'
)

var errPipeAborted = errors.New("pipe aborted")

// shmPipePool creates pipe files, keeps the files of finished pipes for reuse and removes them all on close.
// A pipe that cannot be created (no space to reserve for it) is no pipe: the stream stays on its socket.
type shmPipePool struct {
	dir      string // where the files are made; shmPipeDir() when empty
	maxPipes int    // files at once (live ones, being created included); shmMaxPipes when 0
	mu       sync.Mutex
	idle     []*shmPipeFile
	live     map[*shmPipeFile]struct{} // every file not released yet
	creating int                       // files being created now
	closed   bool
	noted    sync.Once // the first pipe that could not be made is logged at info level, the others at debug
	swept    sync.Once // stale files of killed daemons are removed once: at daemon start, before any file is made
}

func (pool *shmPipePool) get() (*shmPipeFile, error) {
	pool.mu.Lock()
	if pool.closed {
		pool.mu.Unlock()
		return nil, errors.New("the daemon is shutting down")
	}
	if n := len(pool.idle); n > 0 {
		pipe := pool.idle[n-1]
		pool.idle = pool.idle[:n-1]
		pool.mu.Unlock()
		return pipe, nil
	}
	maxPipes := pool.maxPipes
	if maxPipes == 0 {
		maxPipes = shmMaxPipes
	}
	if len(pool.live)+pool.creating >= maxPipes {
		pool.mu.Unlock()
		return nil, fmt.Errorf("%d shared-memory pipes exist already, the most a daemon makes: the stream uses "+
			"its socket", maxPipes)
	}
	pool.creating++
	pool.mu.Unlock()
	pool.sweepStale() // (done already when the daemon started)
	// reserving the pages of a new file takes milliseconds: other streams do not wait for it
	pipe, err := createShmPipeFile(pool.directory(), shmRingSize)
	pool.mu.Lock()
	defer pool.mu.Unlock()
	pool.creating--
	if err != nil {
		return nil, err
	}
	if pool.closed {
		pipe.release()
		return nil, errors.New("the daemon is shutting down")
	}
	if pool.live == nil {
		pool.live = map[*shmPipeFile]struct{}{}
	}
	pool.live[pipe] = struct{}{}
	return pipe, nil
}

// sweepStale removes the pipe files that killed daemons left in the pool's directory, the first time it is called.
// The daemon calls it at start, so that a killed daemon's files go even if no stream of ours ever takes a pipe.
func (pool *shmPipePool) sweepStale() {
	pool.swept.Do(func() { removeStaleShmPipeFiles(pool.directory()) })
}

func (pool *shmPipePool) directory() string {
	if pool.dir != "" {
		return pool.dir
	}
	return shmPipeDir()
}

// release unmaps and removes a pipe file for good.
func (pool *shmPipePool) release(pipe *shmPipeFile) {
	pool.mu.Lock()
	delete(pool.live, pipe)
	pool.mu.Unlock()
	pipe.release()
}

// put keeps a pipe that no client touches any more, or releases it when enough are kept or its filesystem runs
// short of free space (others need it more than a pipe that nobody uses now).
func (pool *shmPipePool) put(pipe *shmPipeFile) {
	spare := shmKeepsSpare(pool.directory())
	pool.mu.Lock()
	if spare && !pool.closed && len(pool.idle) < shmIdlePipes {
		pool.idle = append(pool.idle, pipe)
		pool.mu.Unlock()
		return
	}
	pool.mu.Unlock()
	pool.release(pipe)
}

// close removes every pipe file (pipes in use keep their memory until they end) and releases the idle ones.
func (pool *shmPipePool) close() {
	pool.mu.Lock()
	idle := pool.idle
	pool.idle, pool.closed = nil, true
	for pipe := range pool.live {
		pipe.unlink()
	}
	pool.mu.Unlock()
	for _, pipe := range idle {
		pool.release(pipe)
	}
}

// offerShmPipe picks the pipe offered to a client of this daemon's user that asked for one over a unix socket; nil
// means plain. A client of another user could not map the file (only the daemon's user may open it), but it could
// answer 'S' and announce ring bytes it never wrote: the daemon would forward what an earlier stream, maybe of
// another client, left in the reused ring to a peer of its choosing.
func (d *daemon) offerShmPipe(conn net.Conn, wanted bool) *shmPipeFile {
	if !wanted {
		return nil
	}
	if unixConn, unix := conn.(*net.UnixConn); !unix || !shmPeerIsOurUser(unixConn) {
		return nil
	}
	pipe, err := d.pipes.get()
	if err != nil {
		logged := false
		d.pipes.noted.Do(func() {
			log.Infow("no shared-memory pipe, the stream uses its socket (reported once)", "error", err)
			logged = true
		})
		if !logged {
			log.Debugw("no shared-memory pipe, the stream uses its socket", "error", err)
		}
		return nil
	}
	return pipe
}

// awaitShmAnswer reads the client's answer to a pipe offer; false means plain mode (the pipe is put back then).
func (d *daemon) awaitShmAnswer(conn net.Conn, r *bufio.Reader, pipe *shmPipeFile) (bool, error) {
	_ = conn.SetReadDeadline(time.Now().Add(shmAnswerTimeout))
	answer, err := r.ReadByte()
	_ = conn.SetReadDeadline(time.Time{})
	if err == nil && answer != shmAccept && answer != shmDecline {
		err = fmt.Errorf("unexpected answer %q to a shared-memory pipe offer", answer)
	}
	switch {
	case err != nil:
		d.pipes.release(pipe) // the client may have mapped it: no reuse
		return false, err
	case answer == shmDecline:
		d.pipes.put(pipe)
		return false, nil
	}
	return true, nil
}

// connectStream sends msg (the StreamInfo, or the response that carries it) to the client on conn, then moves the
// bytes of s through the offered pipe if the client takes it, or through the socket. It owns conn, s and pipe.
func (d *daemon) connectStream(conn net.Conn, r *bufio.Reader, s network.Stream, pipe *shmPipeFile, msg []byte) {
	fail := func() {
		_ = s.Reset()
		_ = conn.Close()
	}
	if err := writeDelimited(conn, msg); err != nil {
		if pipe != nil {
			d.pipes.release(pipe)
		}
		fail()
		return
	}
	if pipe != nil {
		accepted, err := d.awaitShmAnswer(conn, r, pipe)
		if err != nil {
			log.Debugw("no answer to a shared-memory pipe offer", "protocol", s.Protocol(), "error", err)
			fail()
			return
		}
		if !accepted {
			pipe = nil
		}
	}
	tuneLocalSocket(conn)
	c := &bufferedConn{Conn: conn, r: r}
	switch {
	case pipe == nil:
		pipeStream(c, s)
	case pipeShm(c, s, pipe):
		d.pipes.put(pipe)
	default:
		d.pipes.release(pipe)
	}
}

type shmPipe struct {
	c    *bufferedConn
	s    network.Stream
	up   []byte // client -> daemon ring
	down []byte // daemon -> client ring
	size uint64

	writeMu sync.Mutex // one record at a time on the socket

	mu          sync.Mutex
	changed     *sync.Cond // any field below changed
	upAvail     uint64     // announced by the client, not yet taken for forwarding
	upUnacked   uint64     // announced by the client, not yet acknowledged
	upEnded     bool       // the client ended its direction or closed the socket
	clientGone  bool       // the client closed the socket (it no longer touches the rings)
	socketDone  bool       // no more records will be read: the client closed the socket or it broke
	downUnacked uint64     // put into the down ring, not yet acknowledged by the client
	aborted     bool
	abortOnce   sync.Once
}

// pipeShm moves stream bytes through the rings of pipe until both directions end, like pipeStream does with socket
// bytes. It returns whether the pipe may be reused: the stream ended cleanly and the client closed the socket.
func pipeShm(c *bufferedConn, s network.Stream, pipe *shmPipeFile) bool {
	size := uint64(pipe.ringSize)
	p := &shmPipe{c: c, s: s, up: pipe.mem[:size], down: pipe.mem[size : 2*size], size: size}
	p.changed = sync.NewCond(&p.mu)
	records := make(chan struct{})
	go func() {
		defer close(records)
		if err := p.readRecords(); err != nil {
			log.Debugw("shared-memory pipe: bad record from the client", "error", err)
			p.abort()
		}
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	downDone := make(chan struct{})
	go func() {
		defer wg.Done()
		if err := p.forwardUp(); err != nil {
			log.Debugw("shared-memory pipe: client -> peer failed", "error", err)
			p.abort()
			return
		}
		_ = s.CloseWrite()
		select {
		case <-downDone:
		case <-records:
			// the socket ended before the peer's direction: as in pipeStream, the peer has clientLeftGrace to end it
			_ = s.SetReadDeadline(time.Now().Add(time.Duration(clientLeftGrace.Load())))
		}
	}()
	go func() {
		defer wg.Done()
		defer close(downDone)
		if err := p.forwardDown(); err != nil {
			log.Debugw("shared-memory pipe: peer -> client failed", "error", err)
			p.abort()
		}
	}()
	wg.Wait()
	_ = s.Close()
	// The client may still be reading announced bytes and acknowledging them: the socket stays open until the
	// client closes it (an aborted pipe closed it already). Only then may another stream reuse the rings.
	<-records
	_ = c.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.clientGone && !p.aborted
}

func (p *shmPipe) abort() {
	p.abortOnce.Do(func() {
		p.mu.Lock()
		p.aborted = true
		p.changed.Broadcast()
		p.mu.Unlock()
		_ = p.s.Reset()
		_ = p.c.Close()
	})
}

// clientLeft reports whether the client's socket ended (it no longer waits for anything on this stream).
func (p *shmPipe) clientLeft() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.socketDone
}

func (p *shmPipe) sendRecord(kind byte, value uint64) error {
	var record [shmRecordLen]byte
	record[0] = kind
	binary.LittleEndian.PutUint64(record[1:], value)
	p.writeMu.Lock()
	_, err := p.c.Write(record[:])
	p.writeMu.Unlock()
	if errors.Is(err, syscall.EPIPE) { // the client closed its socket (maybe before we read its EOF)
		p.mu.Lock()
		p.clientGone = true
		p.mu.Unlock()
	}
	return err
}

// readRecords applies the client's records until the socket ends (nil) or a record is malformed (an error).
func (p *shmPipe) readRecords() error {
	defer func() {
		p.mu.Lock()
		p.socketDone = true
		p.changed.Broadcast()
		p.mu.Unlock()
	}()
	var record [shmRecordLen]byte
	for {
		if _, err := io.ReadFull(p.c.r, record[:]); err != nil {
			p.mu.Lock()
			p.upEnded = true // the client closed the socket (or it broke): what was announced is still forwarded
			// a client that closes its socket with records unread makes the read fail with ECONNRESET instead of EOF
			p.clientGone = err == io.EOF || errors.Is(err, syscall.ECONNRESET)
			p.mu.Unlock()
			return nil
		}
		if err := p.applyRecord(record[0], binary.LittleEndian.Uint64(record[1:])); err != nil {
			return err
		}
	}
}

func (p *shmPipe) applyRecord(kind byte, n uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.changed.Broadcast()
	switch kind {
	case shmRecordData:
		if p.upEnded {
			return errors.New("data after the end of the client's direction")
		}
		if n == 0 || n > p.size-p.upUnacked {
			return fmt.Errorf("client announced %d bytes with %d of %d ring bytes in use", n, p.upUnacked, p.size)
		}
		p.upAvail += n
		p.upUnacked += n
	case shmRecordAck:
		if n == 0 || n > p.downUnacked {
			return fmt.Errorf("client acknowledged %d bytes of %d sent", n, p.downUnacked)
		}
		p.downUnacked -= n
	case shmRecordEOF:
		p.upEnded = true
	default:
		return fmt.Errorf("unknown record type %q", kind)
	}
	return nil
}

// forwardUp writes what the client announces to the stream and acknowledges it; nil once the client's direction
// ended and everything announced was forwarded.
func (p *shmPipe) forwardUp() error {
	if err := sendHandshake(p.s); err != nil {
		return err
	}
	var pos uint64
	for {
		p.mu.Lock()
		for p.upAvail == 0 && !p.upEnded && !p.aborted {
			p.changed.Wait()
		}
		n, aborted := p.upAvail, p.aborted
		if n > shmMaxForward {
			n = shmMaxForward
		}
		p.upAvail -= n
		p.mu.Unlock()
		if aborted {
			return errPipeAborted
		}
		if n == 0 {
			return p.s.SetWriteDeadline(time.Time{}) // ended, nothing left
		}
		for left := n; left > 0; {
			start := pos % p.size
			chunk := minUint64(left, p.size-start)
			if err := writeToPeer(p.s, p.up[start:start+chunk], p.clientLeft); err != nil {
				return err
			}
			pos += chunk
			left -= chunk
		}
		p.mu.Lock()
		p.upUnacked -= n
		p.mu.Unlock()
		// a client that closed its socket needs no acknowledgement, and its last records may still be unread:
		// readRecords ends this direction once it has read them all
		_ = p.sendRecord(shmRecordAck, n)
		// Let yamux's send loop encrypt and send the frame now, while its bytes are still in this core's cache. With
		// one scheduler thread it would otherwise run only once this goroutine blocks, after up to 64 queued frames
		// (16 MiB, long evicted). Measured: 5-9% less CPU in the sending daemon per MiB. (Frames of 16 KiB or more
		// are written from the ring before Write returns, third_party/go-yamux/PATCHED.md: this is for smaller ones.)
		runtime.Gosched()
	}
}

// forwardDown reads the stream into the down ring and announces the bytes; nil after the stream's EOF was sent.
func (p *shmPipe) forwardDown() error {
	var pos uint64
	for {
		p.mu.Lock()
		for p.downUnacked == p.size && !p.aborted && !p.socketDone {
			p.changed.Wait()
		}
		free, aborted := p.size-p.downUnacked, p.aborted
		p.mu.Unlock()
		if aborted {
			return errPipeAborted
		}
		if free == 0 {
			// the ring is full and no acknowledgement can come any more: the client left without reading
			return errors.New("the client closed the stream without reading what the peer sent")
		}
		start := pos % p.size
		n, err := p.s.Read(p.down[start : start+minUint64(free, p.size-start)])
		if n > 0 {
			p.mu.Lock()
			p.downUnacked += uint64(n)
			p.mu.Unlock()
			pos += uint64(n)
			if werr := p.sendRecord(shmRecordData, uint64(n)); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			_ = p.sendRecord(shmRecordEOF, 0) // fails only if the client is gone, like CloseWrite in pipeStream
			return nil
		}
		if err != nil {
			return err
		}
	}
}
