package yamux

// hivemind p2pd patch: stream payloads sent and received without the copy upstream makes of every byte.
// See PATCHED.md. The bytes on the connection are exactly the frames upstream sends.

import (
	"io"
	"sync/atomic"

	pool "github.com/libp2p/go-buffer-pool"
)

// inPlaceMinBody is the smallest frame payload sent without a copy: below it, copying costs less than waiting for
// the send loop.
const inPlaceMinBody = 16 << 10

// buffersWriter is a connection that writes several buffers as if they were one Write (p2pd's batching security
// layer: one TLS write batch, one system call). Sessions over other connections copy every frame as upstream does.
type buffersWriter interface {
	WriteBuffers(bufs ...[]byte) (int, error)
}

// outgoing is an entry of the send queue: buf (a pooled copy of a header, and of the payload unless body is set)
// and, for a large payload, the caller's payload itself.
type outgoing struct {
	buf  []byte
	body *inPlaceBody
}

const (
	inPlaceQueued    int32 = iota // in the send queue
	inPlaceTaken                  // the send loop is writing it
	inPlaceWithdrawn              // its writer gave up (a write deadline): the send loop skips it
)

// inPlaceBody is a payload that stays in its writer's buffer: the writer waits until the send loop has written it.
type inPlaceBody struct {
	data    []byte
	state   int32         // inPlaceQueued, inPlaceTaken or inPlaceWithdrawn (atomic)
	written chan struct{} // closed by the send loop once data was written
}

// sendInPlace queues a frame whose payload is not copied, and returns only when the send loop no longer reads it.
//
// Upstream copies every frame into a pooled buffer because the send loop writes it asynchronously; a writer that
// waits for the send loop needs no copy. Frames stay in the order they were queued.
func (s *Session) sendInPlace(hdr header, body []byte, deadline <-chan struct{}) error {
	buf := pool.Get(headerSize)
	copy(buf, hdr[:])
	item := &inPlaceBody{data: body, written: make(chan struct{})}
	select {
	case <-s.shutdownCh:
		pool.Put(buf)
		return s.shutdownErr
	case s.sendCh <- outgoing{buf: buf, body: item}:
	case <-deadline:
		pool.Put(buf)
		return ErrTimeout
	}
	select {
	case <-item.written:
		return nil
	case <-s.sendDoneCh:
		return s.inPlaceSendEnded(item)
	case <-deadline:
		if atomic.CompareAndSwapInt32(&item.state, inPlaceQueued, inPlaceWithdrawn) {
			return ErrTimeout // never sent: the stream's send window is unchanged
		}
	}
	// the send loop is writing it; a connection write is bounded by ConnectionWriteTimeout
	select {
	case <-item.written:
		return nil
	case <-s.sendDoneCh:
		return s.inPlaceSendEnded(item)
	}
}

// inPlaceSendEnded is the result of an in-place frame when the send loop ended (it no longer reads the payload).
func (s *Session) inPlaceSendEnded(item *inPlaceBody) error {
	select {
	case <-item.written:
		return nil
	default:
	}
	// the send loop ends when the session shuts down, or with an error that shuts it down
	<-s.shutdownCh
	return s.shutdownErr
}

// lendReadBuffer lends b to the receive loop while the reader waits for data on an empty receive buffer; false
// when it is not lent (another reader lent one, or b is empty).
func (s *Stream) lendReadBuffer(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	s.lendLock.Lock()
	defer s.lendLock.Unlock()
	if s.lent != nil {
		return false
	}
	s.lent, s.lentN = b, 0
	return true
}

// takeBackReadBuffer ends a loan of lendReadBuffer: it waits until the receive loop is done with the buffer and
// returns how many bytes it put there (they come before anything in the receive buffer).
func (s *Stream) takeBackReadBuffer() int {
	s.lendLock.Lock()
	defer s.lendLock.Unlock()
	for s.lentBusy {
		s.lendDone.Wait()
	}
	n := s.lentN
	s.lent, s.lentN = nil, 0
	return n
}

// lentReadWindowUpdate sends the window update after a Read took bytes back from its lent buffer. It ignores the
// read deadline: the bytes are delivered (Read waits for a frame being read into its buffer, even past the
// deadline), and a window update given up at an expired deadline would be lost for good (GrowTo already counted
// it), leaving the peer a smaller send window each time until the stream stalls. It waits only while the send
// queue is full.
func (s *Stream) lentReadWindowUpdate() error {
	return s.sendWindowUpdate(nil)
}

// readIntoLentBuffer reads the start of a data frame's payload (length bytes) straight into a lent read buffer,
// if a reader waits with one and no earlier bytes wait in the receive buffer. It returns the bytes of the payload
// it did not read (the caller appends them to the receive buffer as upstream does).
func (s *Stream) readIntoLentBuffer(length uint32, conn io.Reader) (uint32, error) {
	s.lendLock.Lock()
	lent := s.lent
	if lent == nil || s.lentBusy || s.lentN > 0 || s.recvBuf.Len() > 0 {
		s.lendLock.Unlock()
		return length, nil
	}
	if err := s.recvBuf.checkOverflow(length); err != nil {
		s.lendLock.Unlock()
		return length, nil // Append reports it
	}
	s.lentBusy = true
	s.lendLock.Unlock()

	want := length
	if uint32(len(lent)) < want {
		want = uint32(len(lent))
	}
	n, err := io.ReadFull(conn, lent[:want])
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	s.recvBuf.consumeWindow(uint32(n))
	s.lendLock.Lock()
	s.lentBusy, s.lentN = false, n
	s.lendDone.Broadcast()
	s.lendLock.Unlock()
	if err != nil {
		asyncNotify(s.recvNotifyCh)
		return 0, err
	}
	return length - want, nil
}

// consumeWindow accounts for n bytes of the receive window that were read past the buffer (straight into a lent
// read buffer): as if they had been appended and read at once.
func (s *segmentedBuffer) consumeWindow(n uint32) {
	s.bm.Lock()
	s.cap -= n
	s.bm.Unlock()
}

// sendWithdrawnWindowUpdate sends, before a Read waits for bytes, the window update that an earlier Read gave up
// at an expired read deadline (withdrawGrowth), if any: no later Read would find bytes to read and send it when the
// peer had used up its window, and the stream would stall for good (the peer waiting for window, the reader for
// bytes). Nothing is due otherwise: the Read that consumed the bytes sent the update they called for. If this one is
// given up too (the deadline passed), the Read returns ErrTimeout and the next one tries again.
func (s *Stream) sendWithdrawnWindowUpdate() {
	_ = s.sendWindowUpdate(s.readDeadline.wait())
}

// withdrawGrowth takes back n bytes of receive window that GrowTo counted but whose window update was not sent
// (sendMsg gave up at an expired read deadline): the next window update grants them again. Upstream keeps them
// counted, so the peer never learns of them and its send window shrinks for good, by half the stream window each
// time, until the stream stalls.
func (s *segmentedBuffer) withdrawGrowth(n uint32) {
	s.bm.Lock()
	if s.cap >= n {
		s.cap -= n
	} else {
		s.cap = 0 // the peer already sent into credit it was never granted: refuse more until an update
	}
	s.bm.Unlock()
}
