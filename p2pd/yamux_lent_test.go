package main

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/libp2p/go-libp2p/core/network"
	yamuxtransport "github.com/libp2p/go-libp2p/p2p/muxer/yamux"
)

// rawYamuxPeer speaks yamux frames by hand on one end of a pipe, as a hostile or slow peer would: the test decides
// when each byte of a frame is sent. It drains what the session sends and adds up the window it grants to stream 1.
type rawYamuxPeer struct {
	conn    net.Conn
	mu      sync.Mutex
	granted uint64        // window granted to stream 1 by window updates
	updates chan struct{} // one signal per window update for stream 1
}

func newRawYamuxPeer(conn net.Conn) *rawYamuxPeer {
	p := &rawYamuxPeer{conn: conn, updates: make(chan struct{}, 1024)}
	go func() {
		var hdr [12]byte
		for {
			if _, err := io.ReadFull(conn, hdr[:]); err != nil {
				return
			}
			id, length := binary.BigEndian.Uint32(hdr[4:8]), binary.BigEndian.Uint32(hdr[8:12])
			switch hdr[1] {
			case 0: // data
				if _, err := io.CopyN(io.Discard, conn, int64(length)); err != nil {
					return
				}
			case 1: // window update
				if id == 1 {
					p.mu.Lock()
					p.granted += uint64(length)
					p.mu.Unlock()
					p.updates <- struct{}{}
				}
			}
		}
	}()
	return p
}

func (p *rawYamuxPeer) frame(t *testing.T, typ byte, flags uint16, length uint32) {
	t.Helper()
	if err := p.header(typ, flags, length); err != nil {
		t.Fatal(err)
	}
}

func (p *rawYamuxPeer) header(typ byte, flags uint16, length uint32) error {
	var hdr [12]byte
	hdr[1] = typ
	binary.BigEndian.PutUint16(hdr[2:4], flags)
	binary.BigEndian.PutUint32(hdr[4:8], 1)
	binary.BigEndian.PutUint32(hdr[8:12], length)
	_, err := p.conn.Write(hdr[:])
	return err
}

func (p *rawYamuxPeer) grantedWindow() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.granted
}

// rawStream is a yamux session whose peer is a rawYamuxPeer, with the stream (id 1) that the peer opened on it.
type rawStream struct {
	session  network.MuxedConn
	stream   network.MuxedStream
	peer     *rawYamuxPeer
	peerConn net.Conn
}

// acceptRawStream runs a yamux session of transport on serverConn (the listener's side) with a rawYamuxPeer on
// peerConn, lets the peer open stream 1 and returns once the session accepted it and the peer got the ACK with the
// initial window. Close ends both sides.
func acceptRawStream(t *testing.T, transport *yamuxtransport.Transport, serverConn, peerConn net.Conn) *rawStream {
	t.Helper()
	raw, err := acceptRawStreamErr(transport, serverConn, peerConn)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// acceptRawStreamErr is acceptRawStream for callers without a *testing.T: it returns what went wrong.
func acceptRawStreamErr(transport *yamuxtransport.Transport, serverConn, peerConn net.Conn) (*rawStream, error) {
	session, err := transport.NewConn(serverConn, true, &network.NullScope{})
	if err != nil {
		peerConn.Close()
		return nil, err
	}
	raw := &rawStream{session: session, peer: newRawYamuxPeer(peerConn), peerConn: peerConn}
	if err := raw.peer.header(1, 1, 0); err != nil { // a window update with SYN opens stream 1
		raw.Close()
		return nil, err
	}
	if raw.stream, err = session.AcceptStream(); err != nil {
		raw.Close()
		return nil, err
	}
	select {
	case <-raw.peer.updates: // the ACK with the initial window
	case <-time.After(5 * time.Second):
		raw.Close()
		return nil, errors.New("the session did not acknowledge the stream")
	}
	return raw, nil
}

func (r *rawStream) Close() {
	r.peerConn.Close()
	r.session.Close()
}

// readResult is what one Read of a stream returned.
type readResult struct {
	n   int
	err error
}

// readInBackground sets the stream's read deadline (the zero time: none) and starts one Read into buf; its result
// arrives on the channel.
func readInBackground(stream network.MuxedStream, buf []byte, deadline time.Time) <-chan readResult {
	done := make(chan readResult, 1)
	_ = stream.SetReadDeadline(deadline)
	go func() {
		n, err := stream.Read(buf)
		done <- readResult{n, err}
	}()
	return done
}

// lentReadConn signals when the session reads a frame payload straight into target (a reader's lent buffer).
type lentReadConn struct {
	net.Conn
	target []byte
	direct chan struct{}
}

func (c *lentReadConn) Read(p []byte) (int, error) {
	if len(p) > 0 {
		at, start := uintptr(unsafe.Pointer(&p[0])), uintptr(unsafe.Pointer(&c.target[0]))
		if at >= start && at < start+uintptr(len(c.target)) {
			select {
			case c.direct <- struct{}{}:
			default:
			}
		}
	}
	return c.Conn.Read(p)
}

// A Read whose read deadline passes while the session is reading a frame into its buffer returns the frame's
// bytes without an error, and the window update for them reaches the peer. (The patched go-yamux sent that window
// update with the expired deadline: half the time it was dropped, the Read failed with a timeout although it
// delivered bytes, and the peer's send window shrank for good, by half the stream window each time, until the
// stream stalled.)
func TestReadPastDeadlineIntoLentBufferKeepsWindow(t *testing.T) {
	const frame = 64 << 10
	checked := 0
	for attempt := 0; attempt < 40 && checked < 8; attempt++ {
		if checkLentReadPastDeadline(t, frame) {
			checked++
		}
	}
	if checked < 8 {
		t.Fatalf("only %d of 40 attempts read a frame into the waiting reader's buffer", checked)
	}
}

// checkLentReadPastDeadline runs one session; false when the frame did not take the lent-buffer path (the reader
// was not waiting yet), which proves nothing either way.
func checkLentReadPastDeadline(t *testing.T, frame int) bool {
	buf := make([]byte, frame)
	peerConn, serverRaw := net.Pipe()
	serverConn := &lentReadConn{Conn: serverRaw, target: buf, direct: make(chan struct{}, 1)}
	raw := acceptRawStream(t, newYamuxTransport(), serverConn, peerConn)
	defer raw.Close()
	stream, peer := raw.stream, raw.peer
	initial := peer.grantedWindow()

	// Consume just under half of the initial window: no window update is due yet.
	before := int(newYamuxTransport().InitialStreamWindowSize/2) - 1000
	go func() {
		for sent := 0; sent < before; sent += 256 << 10 {
			n := 256 << 10
			if before-sent < n {
				n = before - sent
			}
			if peer.header(0, 0, uint32(n)) != nil {
				return
			}
			if _, err := peerConn.Write(make([]byte, n)); err != nil {
				return
			}
		}
	}()
	if _, err := io.ReadFull(stream, make([]byte, before)); err != nil {
		t.Fatal(err)
	}

	done := readInBackground(stream, buf, time.Now().Add(80*time.Millisecond))
	time.Sleep(20 * time.Millisecond) // let the reader block in Read (lend its buffer); checked below
	peer.frame(t, 0, 0, uint32(frame))
	if _, err := peerConn.Write(make([]byte, frame/2)); err != nil {
		t.Fatal(err)
	}
	lent := false
	select {
	case <-serverConn.direct:
		lent = true
	default:
	}
	time.Sleep(150 * time.Millisecond) // the read deadline passes while the frame is half read
	if _, err := peerConn.Write(make([]byte, frame-frame/2)); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if !lent {
		return false
	}
	if res.n != frame || res.err != nil {
		t.Fatalf("Read returned %d bytes and %v, want the whole frame (%d bytes) and no error", res.n, res.err, frame)
	}
	// The reader consumed more than half of the window: a window update for all of it must reach the peer.
	deadline := time.After(2 * time.Second)
	for peer.grantedWindow()-initial < uint64(before+frame) {
		select {
		case <-peer.updates:
		case <-deadline:
			t.Fatalf("the peer was granted %d bytes after the reader consumed %d: a window update was lost",
				peer.grantedWindow()-initial, before+frame)
		}
	}
	return true
}

// A Read that finds bytes buffered after its read deadline passed may fail to send the window update they call for;
// that update is then sent by a later Read, not lost. (go-yamux counted it as granted before sending it: when the
// send gave up at the expired deadline, the peer's send window shrank for good by half the stream window.)
func TestWindowUpdateGivenUpAtDeadlineIsSentLater(t *testing.T) {
	for attempt := 0; attempt < 8; attempt++ {
		checkWindowUpdateAfterExpiredDeadline(t)
	}
}

func checkWindowUpdateAfterExpiredDeadline(t *testing.T) {
	const segment = 256 << 10
	peerConn, serverConn := net.Pipe()
	raw := acceptRawStream(t, newYamuxTransport(), serverConn, peerConn)
	defer raw.Close()
	stream, peer := raw.stream, raw.peer
	initial := peer.grantedWindow()
	half := int(newYamuxTransport().InitialStreamWindowSize / 2)
	total := half + 2*segment
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for off := 0; off < total; off += segment {
			if peer.header(0, 0, segment) != nil {
				return
			}
			if _, err := peerConn.Write(make([]byte, segment)); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, segment)
	if _, err := io.ReadFull(stream, make([]byte, half-segment)); err != nil { // no update due yet
		t.Fatal(err)
	}
	<-sent
	_ = stream.SetReadDeadline(time.Now().Add(-time.Second))
	n := 0
	for n == 0 { // buffered bytes are read; the update they call for may be given up
		n, _ = stream.Read(buf)
		if n == 0 {
			time.Sleep(time.Millisecond) // the last frame is still being appended to the receive buffer
		}
	}
	_ = stream.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(stream, make([]byte, total-(half-segment)-n)); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(2 * time.Second)
	for peer.grantedWindow()-initial < uint64(half) {
		select {
		case <-peer.updates:
		case <-deadline:
			t.Fatalf("the peer was granted %d bytes after the reader consumed %d: a window update was lost",
				peer.grantedWindow()-initial, total)
		}
	}
}

// A Read that empties the receive buffer after its read deadline passed may give up the window update it calls
// for; when the peer has used up its whole window, no more bytes come and no later Read finds any to read, so the
// next Read (that waits for bytes) must send that update itself. (It only waited: the peer waited for window, the
// reader for bytes, and the stream stalled for good.)
func TestWindowUpdateGivenUpWithTheLastBytesIsSentByTheNextRead(t *testing.T) {
	for attempt := 0; attempt < 16; attempt++ { // the update is given up half the time (it races the deadline)
		checkWindowUpdateAfterLastBytes(t)
	}
}

func checkWindowUpdateAfterLastBytes(t *testing.T) {
	const window = 256 << 10
	transport := newYamuxTransport()
	transport.InitialStreamWindowSize = window
	peerConn, serverConn := net.Pipe()
	raw := acceptRawStream(t, transport, serverConn, peerConn)
	defer raw.Close()
	stream, peer := raw.stream, raw.peer
	initial := peer.grantedWindow()
	peer.frame(t, 0, 0, window) // the whole window: the peer can send nothing more until it gets an update
	if _, err := peerConn.Write(make([]byte, window)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond) // the frame is in the receive buffer
	_ = stream.SetReadDeadline(time.Now().Add(-time.Second))
	if n, _ := stream.Read(make([]byte, window)); n != window { // its window update may be given up
		t.Fatalf("Read returned %d buffered bytes, want %d", n, window)
	}
	done := readInBackground(stream, make([]byte, window), time.Time{}) // waits for bytes
	deadline := time.After(2 * time.Second)
	for peer.grantedWindow()-initial < window {
		select {
		case <-peer.updates:
		case res := <-done:
			t.Fatalf("Read returned %d bytes and %v, nothing was sent", res.n, res.err)
		case <-deadline:
			t.Fatalf("the peer was granted %d bytes after the reader consumed its whole window (%d) and waits for "+
				"more: the stream stalled", peer.grantedWindow()-initial, window)
		}
	}
}
