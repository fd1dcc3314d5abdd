package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/encoding/protowire"
)

// callIDSize is the size of a call id: the 16 raw bytes of a UUID.
const callIDSize = 16

// persistentConn is a control connection after PERSISTENT_CONN_UPGRADE: a multiplexed channel for unary calls
// made by the client and for unary requests handled by it.
type persistentConn struct {
	d      *daemon
	conn   net.Conn
	ctx    context.Context // cancelled when the connection ends
	cancel context.CancelFunc

	writeTurn chan struct{} // holds a token while a message is written: one at a time, and a wait that may end

	mu        sync.Mutex
	incoming  map[string]chan []byte        // call id -> the client's unaryResponse, for requests we forwarded
	outgoing  map[string]context.CancelFunc // call id -> cancels a callUnary the client made
	protocols []protocol.ID                 // unary handlers registered through this connection
}

// send writes one PersistentConnectionResponse; a failed write ends the connection.
func (pc *persistentConn) send(msg []byte) {
	pc.sendUnless(msg, nil)
}

// sendUnless is send that gives up when abort is closed (or the connection ends) before msg's turn to be written
// comes, behind the messages before it (a client that reads slowly); it returns whether msg was written.
func (pc *persistentConn) sendUnless(msg []byte, abort <-chan struct{}) bool {
	select {
	case pc.writeTurn <- struct{}{}:
	case <-abort:
		return false
	case <-pc.ctx.Done():
		return false
	}
	err := writeDelimited(pc.conn, msg)
	<-pc.writeTurn
	if err != nil {
		log.Debugw("cannot write to a persistent connection", "error", err)
		pc.cancel()
		_ = pc.conn.Close()
		return false
	}
	return true
}

func (d *daemon) servePersistentConn(conn net.Conn, r *bufio.Reader) {
	ctx, cancel := context.WithCancel(d.ctx)
	pc := &persistentConn{
		d:         d,
		conn:      conn,
		ctx:       ctx,
		cancel:    cancel,
		writeTurn: make(chan struct{}, 1),
		incoming:  map[string]chan []byte{},
		outgoing:  map[string]context.CancelFunc{},
	}
	d.persistentConnOpened()
	defer func() {
		cancel()
		_ = conn.Close()
		d.removeUnaryHandlersOf(pc)
		d.persistentConnClosed()
	}()
	go func() {
		<-ctx.Done() // daemon shutdown or a failed write: unblock the read loop
		_ = conn.Close()
	}()

	pc.send(encodeOKResponse())
	for {
		msg, err := readDelimited(r, d.maxMsg)
		if err != nil {
			var tooLarge *tooLargeError
			if errors.As(err, &tooLarge) {
				if pc.rejectOversized(r, tooLarge) == nil {
					continue
				}
			} else if err != io.EOF && ctx.Err() == nil {
				log.Debugw("cannot read from a persistent connection", "error", err)
			}
			return
		}
		pc.handleRequest(msg)
	}
}

// rejectOversized skips a message above the size limit and answers it with daemonError when its call id can be
// read, instead of dropping the whole connection.
func (pc *persistentConn) rejectOversized(r *bufio.Reader, e *tooLargeError) error {
	if e.size > math.MaxInt64 { // cannot be skipped (io.CopyN would skip nothing): the connection ends
		return e
	}
	prefixSize := uint64(64)
	if e.size < prefixSize {
		prefixSize = e.size
	}
	prefix := make([]byte, prefixSize)
	if _, err := io.ReadFull(r, prefix); err != nil {
		return err
	}
	if _, err := io.CopyN(io.Discard, r, int64(e.size-prefixSize)); err != nil {
		return err
	}
	log.Warnw("rejected an oversized message on a persistent connection", "size", e.size, "limit", e.limit)
	callID := peekCallID(prefix)
	if callID == nil {
		return nil
	}
	// an oversized answer to a request from a peer: that peer gets an error instead of waiting forever
	remoteError := appendBytesField(nil, 2, []byte("the handler's response was rejected: "+e.Error()))
	answer := appendBytesField(appendBytesField(nil, 1, callID), pcReqUnaryResponse, remoteError)
	pc.deliverResponse(callID, answer)
	pc.send(encodeDaemonError(callID, e.Error()))
	return nil
}

func (pc *persistentConn) handleRequest(msg []byte) {
	req, err := decodePersistentRequest(msg)
	if err != nil {
		if callID := peekCallID(msg); callID != nil {
			pc.send(encodeDaemonError(callID, err.Error()))
		}
		log.Debugw("malformed persistent connection request", "error", err)
		return
	}
	if len(req.callID) != callIDSize {
		pc.send(encodeDaemonError(req.callID, fmt.Sprintf("callId must be %d bytes, got %d", callIDSize, len(req.callID))))
		return
	}
	switch req.kind {
	case pcReqAddUnaryHandler:
		pc.send(pc.addUnaryHandler(req))
	case pcReqRemoveUnaryHandler:
		pc.send(pc.removeUnaryHandler(req))
	case pcReqCallUnary:
		// registered before the next message is read: a cancel right behind the call must find it
		ctx, cancel := context.WithCancel(pc.ctx)
		key := string(req.callID)
		pc.mu.Lock()
		_, busy := pc.outgoing[key]
		if !busy {
			pc.outgoing[key] = cancel
		}
		pc.mu.Unlock()
		if busy {
			cancel()
			pc.send(encodeDaemonError(req.callID, "a call with this callId is already in progress"))
			return
		}
		go pc.callUnary(ctx, cancel, req, msg)
	case pcReqUnaryResponse:
		pc.deliverResponse(req.callID, msg)
	case pcReqCancel:
		pc.mu.Lock()
		cancel := pc.outgoing[string(req.callID)]
		pc.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	default:
		pc.send(encodeDaemonError(req.callID, "PersistentConnectionRequest carries no known message"))
	}
}

func (pc *persistentConn) addUnaryHandler(req *persistentRequest) []byte {
	r, err := decodeUnaryHandlerRequest(req.payload)
	if err != nil {
		return encodeDaemonError(req.callID, err.Error())
	}
	d := pc.d
	pid := protocol.ID(r.proto)
	d.pruneGoneStreamClients([]string{r.proto}) // a name held by a stream client that is gone is free again
	d.mu.Lock()
	defer d.mu.Unlock()
	if handlers, isStream := d.streamHandlers[pid]; isStream {
		return encodeDaemonError(req.callID, streamHolderError(r.proto, handlers,
			"remove it there or stop that process first"))
	}
	if _, ok := d.unaryHandlers[pid]; ok && !r.balanced {
		return encodeDaemonError(req.callID, fmt.Sprintf("handler for protocol %s already set", r.proto))
	}
	addHandler(d, d.unaryHandlers, pid, pc, d.handleUnaryStream)
	pc.mu.Lock()
	pc.protocols = append(pc.protocols, pid)
	pc.mu.Unlock()
	return encodePersistentResponse(req.callID, 0, nil)
}

func (pc *persistentConn) removeUnaryHandler(req *persistentRequest) []byte {
	r, err := decodeUnaryHandlerRequest(req.payload)
	if err != nil {
		return encodeDaemonError(req.callID, err.Error())
	}
	d := pc.d
	pid := protocol.ID(r.proto)
	d.mu.Lock()
	defer d.mu.Unlock()
	handlers, ok := d.unaryHandlers[pid]
	if !ok {
		return encodeDaemonError(req.callID, fmt.Sprintf("handler for protocol %s does not exist", r.proto))
	}
	if !handlers.remove(pc) {
		return encodeDaemonError(req.callID,
			fmt.Sprintf("handler for protocol %s was not created in this persistent connection", r.proto))
	}
	dropIfUnused(d, d.unaryHandlers, pid)
	pc.mu.Lock()
	for i, p := range pc.protocols {
		if p == pid {
			pc.protocols = append(pc.protocols[:i], pc.protocols[i+1:]...)
			break
		}
	}
	pc.mu.Unlock()
	return encodePersistentResponse(req.callID, 0, nil)
}

// removeUnaryHandlersOf unregisters everything a closed connection served.
func (d *daemon) removeUnaryHandlersOf(pc *persistentConn) {
	pc.mu.Lock()
	protocols := pc.protocols
	pc.protocols = nil
	pc.mu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, pid := range protocols {
		if handlers, ok := d.unaryHandlers[pid]; ok {
			handlers.remove(pc)
			dropIfUnused(d, d.unaryHandlers, pid)
		}
	}
}

// callUnary performs a unary call for the client: one request message out, one response back. The call is
// registered in pc.outgoing under its call id with cancel (the cancel function of ctx) already; callUnary removes
// it when it returns.
func (pc *persistentConn) callUnary(ctx context.Context, cancel context.CancelFunc, req *persistentRequest,
	raw []byte) {
	callID := req.callID
	key := string(callID)
	defer func() {
		pc.mu.Lock()
		delete(pc.outgoing, key)
		pc.mu.Unlock()
		cancel()
	}()
	defer func() {
		if r := recover(); r != nil {
			log.Errorw("internal error in a unary call", "panic", r)
			pc.send(encodeDaemonError(req.callID, fmt.Sprintf("internal daemon error: %v", r)))
		}
	}()
	call, err := decodeCallUnary(req.payload)
	if err != nil {
		pc.send(encodeDaemonError(callID, err.Error()))
		return
	}
	pid, err := peer.IDFromBytes(call.peer)
	if err != nil {
		pc.send(encodeDaemonError(callID, fmt.Sprintf("invalid peer id: %v", err)))
		return
	}

	resp := pc.d.exchangeUnary(ctx, pid, protocol.ID(call.proto), callID, raw)
	if ctx.Err() != nil {
		if pc.ctx.Err() == nil {
			pc.send(encodeCancelResponse(callID)) // cancelled by the client
		}
		return
	}
	pc.send(resp)
}

// exchangeUnary opens a stream to the callee, writes the request and returns the PersistentConnectionResponse
// for the client: callUnaryResponse with the callee's answer, or daemonError.
func (d *daemon) exchangeUnary(ctx context.Context, pid peer.ID, proto protocol.ID, callID, raw []byte) []byte {
	s, err := d.host.NewStream(d.streamCtx(ctx), pid, proto)
	if err != nil {
		return encodeDaemonError(callID, err.Error())
	}
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		select {
		case <-ctx.Done():
			_ = s.Reset()
		case <-finished:
		}
	}()

	if err := writeDelimited(s, raw); err != nil {
		_ = s.Reset()
		return encodeDaemonError(callID, err.Error())
	}
	// the answer may wait for the handler as long as the caller lets it, but once it started it must keep coming
	in := &stallReader{s: s, timeout: d.cfg.unaryReadTimeout, waitFirst: true}
	answer, err := readDelimitedReserving(bufio.NewReader(in), d.maxMsg, reserveIn(s.Scope()))
	if err != nil {
		_ = s.Reset()
		return encodeDaemonError(callID, err.Error())
	}
	_ = s.Close()
	fields, err := decodeFields(answer)
	if err != nil {
		return encodeDaemonError(callID, "invalid answer from the remote peer: "+err.Error())
	}
	var result []byte
	for _, f := range fields {
		if f.num == pcReqUnaryResponse && f.typ == protowire.BytesType {
			result = nonNil(f.bytes)
		}
	}
	if result == nil {
		return encodeDaemonError(callID, "invalid answer from the remote peer: it carries no unaryResponse")
	}
	return encodePersistentResponse(callID, pcRespCallUnaryResponse, result)
}

// deliverResponse passes the client's unaryResponse (the whole message) to the stream waiting for it.
func (pc *persistentConn) deliverResponse(callID, raw []byte) {
	key := string(callID)
	pc.mu.Lock()
	waiter := pc.incoming[key]
	delete(pc.incoming, key)
	pc.mu.Unlock()
	if waiter == nil {
		log.Debugw("unaryResponse for an unknown or finished call")
		return
	}
	waiter <- raw // buffered, and removed from the map above: never blocks
}

// handleUnaryStream serves a unary call from a remote peer: it forwards the request to one of the clients that
// registered the protocol and writes back that client's answer.
func (d *daemon) handleUnaryStream(s network.Stream) {
	defer recoverStream(s)
	pid := s.Protocol()
	d.mu.Lock()
	var pc *persistentConn
	if handlers, ok := d.unaryHandlers[pid]; ok && handlers.len() > 0 {
		pc = handlers.pick()
	}
	d.mu.Unlock()
	if pc == nil {
		_ = s.Reset()
		return
	}

	in := &stallReader{s: s, timeout: d.cfg.unaryReadTimeout}
	r := bufio.NewReader(in)
	reserved := 0
	msg, err := readDelimitedReserving(r, d.maxMsg, func(n int) error {
		err := s.Scope().ReserveMemory(n, network.ReservationPriorityAlways)
		if err == nil {
			reserved += n
		}
		return err
	})
	in.stop()
	if err != nil {
		log.Debugw("cannot read a unary request from a peer", "protocol", pid, "error", err)
		_ = s.Reset()
		return
	}
	req, err := decodePersistentRequest(msg)
	if err != nil || req.kind != pcReqCallUnary || len(req.callID) != callIDSize {
		log.Debugw("malformed unary request from a peer", "protocol", pid, "error", err)
		_ = s.Reset()
		return
	}
	call, err := decodeCallUnary(req.payload)
	if err != nil {
		_ = s.Reset()
		return
	}
	call.peer = []byte(s.Conn().RemotePeer()) // the authenticated caller, whatever it claimed

	key := string(req.callID)
	callID := []byte(key) // not req.callID, a slice of msg: msg is not kept once it is handed on
	waiter := make(chan []byte, 1)
	pc.mu.Lock()
	if _, busy := pc.incoming[key]; busy || pc.ctx.Err() != nil {
		pc.mu.Unlock()
		_ = s.Reset()
		return
	}
	pc.incoming[key] = waiter
	pc.mu.Unlock()
	defer func() {
		pc.mu.Lock()
		if pc.incoming[key] == waiter {
			delete(pc.incoming, key)
		}
		pc.mu.Unlock()
	}()

	// the caller writes nothing more: any read result means it closed or reset the stream
	callerGone := make(chan struct{})
	go func() {
		var b [1]byte
		_, _ = r.Read(b[:])
		close(callerGone)
	}()

	// a caller that leaves while its request waits behind others for a slow client is not waited for: its request
	// would stay in memory, no longer counted in the stream's scope, until the client reads again
	if !pc.sendUnless(encodePersistentResponse(req.callID, pcRespRequestHandling, encodeCallUnary(call)), callerGone) {
		_ = s.Reset()
		return
	}
	// the request was handed on (a reset stream releases its reservations by itself, on the paths above)
	s.Scope().ReleaseMemory(reserved)

	select {
	case answer := <-waiter:
		// a caller that stops reading (its window stays shut) must not hold the answer, this goroutine and the
		// stream for as long as it keeps the stream open, nor more answers than its peer's memory limit allows
		// (released with the stream)
		if err := s.Scope().ReserveMemory(len(answer), network.ReservationPriorityAlways); err != nil {
			log.Debugw("dropping a unary answer: the calling peer holds too much memory already", "protocol", pid,
				"peer", s.Conn().RemotePeer(), "size", len(answer), "error", err)
			_ = s.Reset()
			return
		}
		timeout := answerWriteTimeout(len(answer))
		_ = s.SetWriteDeadline(time.Now().Add(timeout))
		if err := writeDelimited(s, answer); err != nil {
			log.Debugw("cannot write a unary answer to a peer (it did not read it in time, or left)", "protocol", pid,
				"peer", s.Conn().RemotePeer(), "size", len(answer), "timeout", timeout, "error", err)
			_ = s.Reset()
			return
		}
		_ = s.Close()
	case <-callerGone:
		pc.send(encodeCancelResponse(callID))
		_ = s.Reset()
	case <-pc.ctx.Done():
		_ = s.Reset()
	}
}

// reserveIn returns a readDelimitedReserving callback that reserves in a stream's scope (released when the
// stream ends).
func reserveIn(scope network.StreamScope) func(int) error {
	return func(n int) error { return scope.ReserveMemory(n, network.ReservationPriorityAlways) }
}

// deadlineReader is a libp2p stream, or any connection with read deadlines.
type deadlineReader interface {
	io.Reader
	SetReadDeadline(time.Time) error
}

// stallReader drops a sender that stops in the middle of a message: every read must receive something within
// timeout (a trickle that keeps arriving is only bounded by the message size limit and the resource manager's
// stream limits). With waitFirst, the first read may wait without a deadline (an answer waits for a handler).
type stallReader struct {
	s         deadlineReader
	timeout   time.Duration
	waitFirst bool
	stopped   bool
}

func (sr *stallReader) Read(p []byte) (int, error) {
	if sr.stopped {
		return sr.s.Read(p)
	}
	if !sr.waitFirst {
		_ = sr.s.SetReadDeadline(time.Now().Add(sr.timeout))
	}
	n, err := sr.s.Read(p)
	if n > 0 {
		sr.waitFirst = false
	}
	return n, err
}

// stop removes the deadline: the rest of the stream may stay silent for any time. Not concurrent with Read.
func (sr *stallReader) stop() {
	if !sr.stopped {
		sr.stopped = true
		_ = sr.s.SetReadDeadline(time.Time{})
	}
}

// unaryAnswerGrace and unaryAnswerMinRate (bytes per second) bound how long a peer that called us may take to read
// our answer (answerWriteTimeout): one that stopped reading kept the answer (up to -persistentConnMaxMsgSize, counted
// in no scope), two goroutines and its stream for as long as it liked. The defaults, the floor of averaging's state
// downloads, are far below any usable link: 124 s for 4 MiB. (Tests shorten them.)
var unaryAnswerGrace, unaryAnswerMinRate atomic.Int64

func init() {
	unaryAnswerGrace.Store(int64(60 * time.Second))
	unaryAnswerMinRate.Store(64 << 10)
}

// answerWriteTimeout is how long an answer of n bytes may take to leave: unaryAnswerGrace + n / unaryAnswerMinRate.
func answerWriteTimeout(n int) time.Duration {
	return time.Duration(unaryAnswerGrace.Load()) + time.Duration(n)*time.Second/time.Duration(unaryAnswerMinRate.Load())
}
