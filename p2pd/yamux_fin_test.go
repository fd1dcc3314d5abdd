package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"runtime/pprof"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	yamuxtransport "github.com/libp2p/go-libp2p/p2p/muxer/yamux"
)

// yamux frame flags (the spec's values)
const (
	yamuxFlagFIN uint16 = 4 // half-closes the stream
	yamuxFlagRST uint16 = 8 // resets the stream
)

// A peer may half-close a stream with the FIN flag on its last data frame (the yamux spec allows it on a data
// frame or a window update). The frame's payload comes before the end of the stream: a Read that runs after the
// header arrived but before the payload was read gets those bytes, not EOF. (go-yamux processed the FIN before
// reading the payload: such a Read returned EOF and the last frame's bytes were lost.)
func TestFinOnDataFrameKeepsItsPayload(t *testing.T) {
	for _, lend := range []bool{false, true} {
		name := "Read after the header"
		if lend {
			name = "Read waiting when the header arrives"
		}
		t.Run(name, func(t *testing.T) {
			peerConn, serverConn := net.Pipe()
			raw := acceptRawStream(t, newYamuxTransport(), serverConn, peerConn)
			defer raw.Close()
			payload := bytes.Repeat([]byte{9}, 40<<10)
			got := make(chan []byte, 1)
			startRead := func() {
				go func() {
					b, err := io.ReadAll(raw.stream)
					if err != nil {
						t.Errorf("reading the stream failed: %v", err)
					}
					got <- b
				}()
			}
			if lend {
				startRead()
				time.Sleep(20 * time.Millisecond) // the reader waits in Read (lends its buffer)
			}
			raw.peer.frame(t, 0, yamuxFlagFIN, uint32(len(payload))) // returns once the session read the header
			if !lend {
				startRead()
			}
			time.Sleep(50 * time.Millisecond) // the reader sees the stream half-closed before the payload comes
			if _, err := peerConn.Write(payload); err != nil {
				t.Fatal(err)
			}
			select {
			case b := <-got:
				if !bytes.Equal(b, payload) {
					t.Fatalf("the reader got %d bytes before EOF, the FIN frame carried %d", len(b), len(payload))
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the reader got no EOF after a data frame with FIN")
			}
		})
	}
}

// streamEnd says how a stress run's peer ends the stream after its last byte.
type streamEnd int

const (
	finOnLastData   streamEnd = iota // FIN on the last data frame, which carries payload
	finOnEmptyData                   // FIN on a data frame of its own, without payload
	finOnWindowFlag                  // FIN on a window update (what go-yamux sends)
	resetAfterData                   // RST on a window update: the reader gets a prefix, then a reset, never EOF
	closeReadLocal                   // the reader's side calls CloseRead at a random moment, also during a Read
	streamEnds
)

// stressReader reads a stream to its end as p2pd's forwarding loops do, with Read buffers of random sizes (from
// one byte to 4 MiB, all slices of one reused buffer like a ring), random short read deadlines and random pauses
// (bytes then pile up in the receive buffer). It returns every byte it got, in order, and the error that ended the
// stream (nil for EOF).
func stressReader(rng *rand.Rand, stream network.MuxedStream, progress *atomic.Int64) ([]byte, error) {
	sizes := []int{1, 7, 512, 4 << 10, 16<<10 - 1, 64 << 10, 256<<10 + 24, 512 << 10, 1 << 20, 4 << 20}
	ring := make([]byte, 4<<20)
	var got []byte
	for {
		size := sizes[rng.Intn(len(sizes))]
		off := rng.Intn(len(ring) - size + 1)
		buf := ring[off : off+size]
		switch rng.Intn(4) {
		case 0:
			_ = stream.SetReadDeadline(time.Now().Add(time.Duration(rng.Intn(300)) * time.Microsecond))
		case 1:
			_ = stream.SetReadDeadline(time.Now().Add(-time.Second))
		default:
			_ = stream.SetReadDeadline(time.Time{})
		}
		n, err := stream.Read(buf)
		got = append(got, buf[:n]...)
		progress.Store(int64(len(got)))
		for i := range buf[:n] {
			buf[i] = 0xEE // bytes written here after Read returned would be lost from the stream: the check finds them
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			continue
		}
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
		if rng.Intn(8) == 0 {
			time.Sleep(time.Duration(rng.Intn(200)) * time.Microsecond)
		}
	}
}

// stressPeer sends data to stream 1 in frames of random sizes (1 byte up to the window it was granted, at most
// maxFrame), their payload in up to three writes, and ends the stream as end says. It keeps to the window.
func stressPeer(rng *rand.Rand, raw *rawStream, data []byte, maxFrame int, end streamEnd, stop <-chan struct{},
	progress *atomic.Int64) error {
	const initialWindow = 256 << 10 // a stream's window before its first window update
	sent := 0
	waitStart := time.Now()
	for sent < len(data) {
		for drained := false; !drained; {
			select {
			case <-raw.peer.updates:
			default:
				drained = true
			}
		}
		avail := initialWindow + int(raw.peer.grantedWindow()) - sent
		if avail <= 0 {
			if time.Since(waitStart) > 5*time.Second {
				if end == closeReadLocal {
					return nil // the reader stopped reading: no window comes
				}
				return fmt.Errorf("no window update for 5 s after %d of %d bytes", sent, len(data))
			}
			select {
			case <-raw.peer.updates:
			case <-time.After(10 * time.Millisecond):
			case <-stop:
				return nil
			}
			continue
		}
		waitStart = time.Now()
		size := avail
		if maxFrame < size {
			size = maxFrame
		}
		if len(data)-sent < size {
			size = len(data) - sent
		}
		if rng.Intn(3) > 0 {
			size = 1 + rng.Intn(size)
		}
		var flags uint16
		if sent+size == len(data) && end == finOnLastData {
			flags = yamuxFlagFIN
		}
		if err := raw.peer.header(0, flags, uint32(size)); err != nil {
			return err
		}
		payload := data[sent : sent+size]
		for len(payload) > 0 {
			part := len(payload)
			if rng.Intn(2) == 0 {
				part = 1 + rng.Intn(part)
			}
			if _, err := raw.peerConn.Write(payload[:part]); err != nil {
				return err
			}
			payload = payload[part:]
			if len(payload) > 0 && rng.Intn(4) == 0 {
				time.Sleep(time.Duration(rng.Intn(100)) * time.Microsecond)
			}
		}
		sent += size
		progress.Store(int64(sent))
	}
	switch end {
	case finOnEmptyData:
		return raw.peer.header(0, yamuxFlagFIN, 0)
	case finOnWindowFlag:
		return raw.peer.header(1, yamuxFlagFIN, 0)
	case resetAfterData:
		return raw.peer.header(1, yamuxFlagRST, 0)
	}
	return nil
}

// stressIterations is how many sessions a stress test runs: n, times YAMUX_STRESS (for long runs by hand).
func stressIterations(n int) int {
	if k, err := strconv.Atoi(os.Getenv("YAMUX_STRESS")); err == nil && k > 0 {
		return n * k
	}
	return n
}

// Every byte a peer sends reaches the reader in order, and EOF only after the last one, whatever the sizes of the
// frames (1 byte up to the whole window) and of the Read buffers, wherever the FIN comes (on the last data frame,
// on an empty one or on a window update), with read deadlines expiring while a frame is read into a waiting
// reader's buffer, and readers that pause (bytes go to the receive buffer). A reset or a local CloseRead ends the
// stream with an error after an in-order prefix, never with EOF.
// (It found both a lost last frame with FIN and a stream stalled by a window update given up at a deadline.)
func TestYamuxStreamDeliversEveryByteBeforeEOF(t *testing.T) {
	if s, err := strconv.ParseInt(os.Getenv("YAMUX_STRESS_RUN"), 10, 64); err == nil { // one run again, by hand
		end, _ := strconv.Atoi(os.Getenv("YAMUX_STRESS_END"))
		if err := stressOneStream(s, streamEnd(end)); err != nil {
			t.Fatal(err)
		}
		return
	}
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	iterations := stressIterations(60)
	for it := 0; it < iterations; it++ {
		runSeed := rng.Int63()
		end := streamEnd(it % int(streamEnds))
		if err := stressOneStream(runSeed, end); err != nil {
			t.Fatalf("run %d (seed %d, end %d): %v", it, runSeed, end, err)
		}
	}
}

func stressOneStream(seed int64, end streamEnd) error {
	rng := rand.New(rand.NewSource(seed))
	transport := newYamuxTransport()
	if rng.Intn(2) == 0 {
		transport.InitialStreamWindowSize = 256 << 10 // go-yamux's default: window updates every 128 KiB read
	}
	var peerConn, serverConn net.Conn
	if rng.Intn(2) == 0 {
		peerConn, serverConn = net.Pipe()
	} else {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := l.Accept()
			accepted <- c
		}()
		if peerConn, err = net.Dial("tcp", l.Addr().String()); err != nil {
			l.Close()
			return err
		}
		serverConn = <-accepted
		l.Close()
		if serverConn == nil {
			peerConn.Close()
			return errors.New("no TCP connection accepted")
		}
	}
	raw, err := acceptRawStreamErr(transport, serverConn, peerConn)
	if err != nil {
		return err
	}
	defer raw.Close()

	maxFrames := []int{1, 100, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 16 << 20}
	maxFrame := maxFrames[rng.Intn(len(maxFrames))]
	size := 3 << 20
	if maxFrame*2000 < size {
		size = maxFrame * 2000 // at most a few thousand frames
	}
	data := make([]byte, 1+rng.Intn(size))
	rng.Read(data)

	peerRng := rand.New(rand.NewSource(rng.Int63()))
	sendErr, stop := make(chan error, 1), make(chan struct{})
	var sent, received atomic.Int64
	go func() { sendErr <- stressPeer(peerRng, raw, data, maxFrame, end, stop, &sent) }()

	if end == closeReadLocal { // while the reader reads or waits in Read
		time.AfterFunc(time.Duration(rng.Intn(3000))*time.Microsecond, func() { _ = raw.stream.CloseRead() })
	}
	type result struct {
		got []byte
		err error
	}
	read := make(chan result, 1)
	readerRng := rand.New(rand.NewSource(rng.Int63()))
	go func() {
		got, err := stressReader(readerRng, raw.stream, &received)
		read <- result{got, err}
	}()
	var res result
	select {
	case res = <-read:
	case <-time.After(20 * time.Second):
		peerState := "sending"
		select {
		case err := <-sendErr:
			peerState = fmt.Sprintf("done (%v)", err)
		default:
		}
		if f, err := os.CreateTemp("", "yamux-stress-goroutines-*.txt"); err == nil {
			_ = pprof.Lookup("goroutine").WriteTo(f, 2)
			f.Close()
			peerState += ", goroutines in " + f.Name()
		}
		return fmt.Errorf("the reader did not reach the end of a %d-byte stream (max frame %d): it got %d bytes, "+
			"the peer sent %d and was granted %d, peer %s", len(data), maxFrame, received.Load(), sent.Load(),
			raw.peer.grantedWindow(), peerState)
	}
	if !bytes.HasPrefix(data, res.got) {
		i := 0
		for i < len(res.got) && res.got[i] == data[i] {
			i++
		}
		return fmt.Errorf("the reader got %d bytes that differ from the sent ones from byte %d on (of %d sent, max "+
			"frame %d)", len(res.got), i, len(data), maxFrame)
	}
	switch end {
	case resetAfterData, closeReadLocal:
		if res.err == nil {
			return fmt.Errorf("the reader got EOF after %d of %d bytes on a stream that was reset", len(res.got),
				len(data))
		}
		if !errors.Is(res.err, network.ErrReset) {
			return fmt.Errorf("the reader got %v after %d of %d bytes, want a reset", res.err, len(res.got), len(data))
		}
	default:
		if res.err != nil {
			return fmt.Errorf("the reader got %v after %d of %d bytes", res.err, len(res.got), len(data))
		}
		if len(res.got) != len(data) {
			return fmt.Errorf("the reader got EOF after %d of %d bytes (max frame %d)", len(res.got), len(data),
				maxFrame)
		}
	}
	close(stop) // ends a peer still waiting for window (the reader stopped)
	raw.peerConn.Close()
	if err := <-sendErr; err != nil && end != closeReadLocal && end != resetAfterData {
		return fmt.Errorf("the peer: %w", err)
	}
	return nil
}

// The same with a go-yamux session as the peer (over a plain connection: every frame copied, as an unpatched
// go-yamux sends them; or with WriteBuffers), writing chunks of random sizes with go-yamux's default frames of
// 64 KiB or p2pd's 256 KiB, and a window that auto-tuning grows (the sessions measure their round trip time): the
// reader gets every byte in order and EOF after the last one (the peer's CloseWrite), or a reset.
func TestYamuxStreamFromGoYamuxPeerDeliversEveryByte(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	iterations := stressIterations(30)
	for it := 0; it < iterations; it++ {
		runSeed := rng.Int63()
		if err := stressGoYamuxPeer(runSeed); err != nil {
			t.Fatalf("run %d (seed %d): %v", it, runSeed, err)
		}
	}
}

func stressGoYamuxPeer(seed int64) error {
	rng := rand.New(rand.NewSource(seed))
	readerTransport, writerTransport := newYamuxTransport(), newYamuxTransport()
	if rng.Intn(2) == 0 {
		readerTransport.InitialStreamWindowSize = 256 << 10
	}
	if rng.Intn(2) == 0 {
		defaults := *yamuxtransport.DefaultTransport // an unpatched daemon's settings: 64 KiB frames
		writerTransport = &defaults
	}
	peerConn, serverConn := net.Pipe()
	var writerConn net.Conn = peerConn
	if rng.Intn(2) == 0 {
		writerConn = &buffersConn{Conn: peerConn}
	}
	server, err := readerTransport.NewConn(serverConn, true, &network.NullScope{})
	if err != nil {
		return err
	}
	defer server.Close()
	client, err := writerTransport.NewConn(writerConn, false, &network.NullScope{})
	if err != nil {
		return err
	}
	defer client.Close()

	data := make([]byte, 1+rng.Intn(4<<20))
	rng.Read(data)
	reset := rng.Intn(5) == 0
	writerRng := rand.New(rand.NewSource(rng.Int63()))
	written := make(chan error, 1)
	go func() {
		stream, err := client.OpenStream(context.Background())
		if err != nil {
			written <- err
			return
		}
		for off := 0; off < len(data); {
			n := 1 + writerRng.Intn(len(data)-off)
			if writerRng.Intn(2) == 0 && n > 4<<10 {
				n = 1 + writerRng.Intn(4<<10)
			}
			if _, err := stream.Write(data[off : off+n]); err != nil {
				written <- err
				return
			}
			off += n
			if writerRng.Intn(8) == 0 {
				time.Sleep(time.Duration(writerRng.Intn(300)) * time.Microsecond)
			}
		}
		if reset {
			written <- stream.Reset()
		} else {
			written <- stream.CloseWrite()
		}
	}()
	stream, err := server.AcceptStream()
	if err != nil {
		return err
	}
	type result struct {
		got []byte
		err error
	}
	read := make(chan result, 1)
	var received atomic.Int64
	readerRng := rand.New(rand.NewSource(rng.Int63()))
	go func() {
		got, err := stressReader(readerRng, stream, &received)
		read <- result{got, err}
	}()
	var res result
	select {
	case res = <-read:
	case <-time.After(20 * time.Second):
		return fmt.Errorf("the reader did not reach the end of a %d-byte stream: it got %d bytes", len(data),
			received.Load())
	}
	if !bytes.HasPrefix(data, res.got) {
		return fmt.Errorf("the reader got %d bytes that differ from the %d sent", len(res.got), len(data))
	}
	if reset {
		if res.err == nil {
			return fmt.Errorf("the reader got EOF after %d of %d bytes on a stream that was reset", len(res.got),
				len(data))
		}
		return nil
	}
	if res.err != nil || len(res.got) != len(data) {
		return fmt.Errorf("the reader got %d of %d bytes, then %v", len(res.got), len(data), res.err)
	}
	if err := <-written; err != nil {
		return fmt.Errorf("the writer: %w", err)
	}
	return nil
}
