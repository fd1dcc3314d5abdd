package main

// Stress tests of the persistent-connection unary protocol with real daemons in this process: two daemons on
// loopback TCP, clients speaking the control protocol over their unix sockets as hivemind's persistent.py does.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"google.golang.org/protobuf/encoding/protowire"
)

// startUnaryTestDaemon starts a daemon that listens on loopback TCP and on a unix control socket of its own.
func startUnaryTestDaemon(t testing.TB, args ...string) (*daemon, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "p2pd-unary-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "p2pd.sock")
	o := &options{}
	all := append([]string{"-q", "-listen=/unix" + sock, "-hostAddrs=/ip4/127.0.0.1/tcp/0", "-relay=0"}, args...)
	if err := newFlagSet(o).Parse(all); err != nil {
		t.Fatal(err)
	}
	cfg, err := buildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	d, err := newDaemon(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go d.serve()
	t.Cleanup(func() { d.shutdown(0) })
	return d, sock
}

func connectDaemons(t testing.TB, a, b *daemon) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := a.host.Connect(ctx, peer.AddrInfo{ID: b.host.ID(), Addrs: b.host.Addrs()}); err != nil {
		t.Fatal(err)
	}
}

// pcMessage is a PersistentConnectionResponse as the test client sees it.
type pcMessage struct {
	callID  string
	kind    protowire.Number
	payload []byte
}

// testPersistentClient is a client's persistent connection: it sends requests and routes what comes back.
type testPersistentClient struct {
	conn    net.Conn
	writeMu sync.Mutex
	in      chan pcMessage // every message, in order (buffered; the reader blocks when it is full)
	done    chan struct{}  // closed when the connection ends
}

func openPersistent(t testing.TB, sock string) *testPersistentClient {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	if err := writeDelimited(conn, appendVarintField(nil, 1, reqPersistentConnUpgrade)); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	ok, err := readDelimited(r, 1<<20)
	if err != nil || !bytes.Equal(ok, encodeOKResponse()) {
		t.Fatalf("upgrade answered %x, %v", ok, err)
	}
	c := &testPersistentClient{conn: conn, in: make(chan pcMessage, 1<<16), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer close(c.in)
		for {
			msg, err := readDelimited(r, 64<<20)
			if err != nil {
				return
			}
			fields, err := decodeFields(msg)
			if err != nil {
				panic(fmt.Sprintf("malformed message from the daemon: %v", err))
			}
			var m pcMessage
			for _, f := range fields {
				if f.num == 1 {
					m.callID = string(f.bytes)
				} else {
					m.kind, m.payload = f.num, f.bytes
				}
			}
			c.in <- m
		}
	}()
	return c
}

func (c *testPersistentClient) send(msgs ...[]byte) error {
	var wire []byte
	for _, m := range msgs {
		wire = append(wire, protowire.AppendVarint(nil, uint64(len(m)))...)
		wire = append(wire, m...)
	}
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	_, err := c.conn.Write(wire)
	return err
}

func newCallID() []byte {
	id := make([]byte, callIDSize)
	_, _ = rand.Read(id)
	return id
}

func callUnaryMsg(callID []byte, to peer.ID, proto string, data []byte) []byte {
	call := encodeCallUnary(&callUnaryRequest{peer: []byte(to), proto: proto, data: data})
	return appendBytesField(appendBytesField(nil, 1, callID), pcReqCallUnary, call)
}

func cancelMsg(callID []byte) []byte {
	return appendBytesField(appendBytesField(nil, 1, callID), pcReqCancel, nil)
}

func addHandlerMsg(callID []byte, proto string, balanced bool) []byte {
	inner := appendStringField(nil, 1, proto)
	if balanced {
		inner = appendVarintField(inner, 2, 1)
	}
	return appendBytesField(appendBytesField(nil, 1, callID), pcReqAddUnaryHandler, inner)
}

func removeHandlerMsg(callID []byte, proto string) []byte {
	return appendBytesField(appendBytesField(nil, 1, callID), pcReqRemoveUnaryHandler, appendStringField(nil, 1, proto))
}

// unaryResponseMsg answers a request: CallUnaryResponse{response=data} (field 1), or {error=data} (field 2).
func unaryResponseMsg(callID []byte, data []byte, isError bool) []byte {
	num := protowire.Number(1)
	if isError {
		num = 2
	}
	return appendBytesField(appendBytesField(nil, 1, callID), pcReqUnaryResponse, appendBytesField(nil, num, data))
}

// waitFor waits for a message with callID and drops the messages before it.
func (c *testPersistentClient) waitFor(t testing.TB, callID []byte, timeout time.Duration) pcMessage {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m, ok := <-c.in:
			if !ok {
				t.Fatalf("the connection ended while waiting for call %x", callID)
			}
			if m.callID == string(callID) {
				return m
			}
		case <-deadline:
			t.Fatalf("no answer for call %x in %s", callID, timeout)
		}
	}
}

func (c *testPersistentClient) addHandler(t testing.TB, proto string) {
	t.Helper()
	id := newCallID()
	if err := c.send(addHandlerMsg(id, proto, true)); err != nil {
		t.Fatal(err)
	}
	if m := c.waitFor(t, id, 5*time.Second); m.kind != 0 {
		t.Fatalf("adding handler %s: %d %q", proto, m.kind, m.payload)
	}
}

// persistentConnOf returns the daemon's side of the connection that registered proto (first of its handlers).
func persistentConnOf(t testing.TB, d *daemon, proto string) *persistentConn {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	h, ok := d.unaryHandlers[protocol.ID(proto)]
	if !ok || h.len() == 0 {
		t.Fatalf("no handler for %s", proto)
	}
	return h.items[0]
}

func (pc *persistentConn) callCounts() (int, int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	return len(pc.incoming), len(pc.outgoing)
}

// settleGoroutines waits until at most want goroutines run; it returns the last count.
func settleGoroutines(want int, timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	for {
		n := runtime.NumGoroutine()
		if n <= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func goroutineDump() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "p2pd") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// A cancel sent right behind its callUnary (a call cancelled at once: a timeout of zero, a caller cancelled
// while its request was being written) must cancel the call: the daemon answers with cancel and the callee's
// stream is reset, even when the callee's handler never answers.
func TestCancelRightBehindItsCallCancelsIt(t *testing.T) {
	a, sockA := startUnaryTestDaemon(t)
	b, sockB := startUnaryTestDaemon(t)
	connectDaemons(t, a, b)
	callee := openPersistent(t, sockB)
	callee.addHandler(t, "/test/never")
	caller := openPersistent(t, sockA)
	caller.addHandler(t, "/test/caller")
	pcA := persistentConnOf(t, a, "/test/caller")

	const calls = 50
	for i := 0; i < calls; i++ {
		id := newCallID()
		if err := caller.send(callUnaryMsg(id, b.host.ID(), "/test/never", []byte("x")), cancelMsg(id)); err != nil {
			t.Fatal(err)
		}
		if m := caller.waitFor(t, id, 5*time.Second); m.kind != pcRespCancel {
			t.Fatalf("call %d: a cancelled call was answered with %d %q", i, m.kind, m.payload)
		}
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		_, outgoing := pcA.callCounts()
		if outgoing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d cancelled calls are still in progress", outgoing)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testCallee answers the requests a persistent connection receives: the request's data starts with the behaviour
// ('a' answer, 'e' answer with an error, 'd' answer twice, 'n' never answer), the answer is "ok:"+data or
// "err:"+data after a random delay of up to maxDelay.
type testCallee struct {
	c        *testPersistentClient
	maxDelay time.Duration
	rng      *lockedRand
	handled  sync.WaitGroup
	cancels  int64
	mu       sync.Mutex
	received map[string]bool
}

func (callee *testCallee) got(callID []byte) bool {
	callee.mu.Lock()
	defer callee.mu.Unlock()
	return callee.received[string(callID)]
}

type lockedRand struct {
	mu  sync.Mutex
	rng *mrand.Rand
}

func (r *lockedRand) Intn(n int) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rng.Intn(n)
}

func (callee *testCallee) serve() {
	for m := range callee.c.in {
		switch m.kind {
		case pcRespRequestHandling:
			call, err := decodeCallUnary(m.payload)
			if err != nil || len(call.data) == 0 {
				panic(fmt.Sprintf("malformed requestHandling: %v", err))
			}
			id := []byte(m.callID)
			data := append([]byte(nil), call.data...)
			callee.mu.Lock()
			if callee.received == nil {
				callee.received = map[string]bool{}
			}
			callee.received[m.callID] = true
			callee.mu.Unlock()
			delay := time.Duration(callee.rng.Intn(int(callee.maxDelay)+1)) + 0
			callee.handled.Add(1)
			go func() {
				defer callee.handled.Done()
				time.Sleep(delay)
				switch data[0] {
				case 'a':
					_ = callee.c.send(unaryResponseMsg(id, append([]byte("ok:"), data...), false))
				case 'e':
					_ = callee.c.send(unaryResponseMsg(id, append([]byte("err:"), data...), true))
				case 'd':
					_ = callee.c.send(unaryResponseMsg(id, append([]byte("ok:"), data...), false),
						unaryResponseMsg(id, []byte("second answer"), false))
				}
			}()
		case pcRespCancel:
			callee.mu.Lock()
			callee.cancels++
			callee.mu.Unlock()
		}
	}
}

// callRouter hands the messages of a caller's connection to the calls waiting for them, by call id.
type callRouter struct {
	mu         sync.Mutex
	calls      map[string]*routedCall
	unexpected []pcMessage
}

type routedCall struct {
	first chan pcMessage
	count int
}

func newCallRouter(c *testPersistentClient) *callRouter {
	r := &callRouter{calls: map[string]*routedCall{}}
	go func() {
		for m := range c.in {
			r.mu.Lock()
			call := r.calls[m.callID]
			if call == nil {
				r.unexpected = append(r.unexpected, m)
			} else {
				call.count++
				if call.count == 1 {
					call.first <- m
				}
			}
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *callRouter) expect(callID []byte) *routedCall {
	call := &routedCall{first: make(chan pcMessage, 1)}
	r.mu.Lock()
	r.calls[string(callID)] = call
	r.mu.Unlock()
	return call
}

// checkAnswer reports what is wrong with the answer m to a call that sent data ("" if nothing).
func checkAnswer(m pcMessage, data []byte, cancelled, disrupted bool) string {
	switch m.kind {
	case pcRespCallUnaryResponse:
		fields, err := decodeFields(m.payload)
		if err != nil || len(fields) != 1 {
			return fmt.Sprintf("malformed CallUnaryResponse %x", m.payload)
		}
		f := fields[0]
		switch {
		case data[0] == 'a' || data[0] == 'd':
			if f.num != 1 || !bytes.Equal(f.bytes, append([]byte("ok:"), data...)) {
				return fmt.Sprintf("answer %d %q to a call that sent %q", f.num, f.bytes, data)
			}
		case data[0] == 'e':
			if f.num != 2 || !bytes.Equal(f.bytes, append([]byte("err:"), data...)) {
				return fmt.Sprintf("answer %d %q to a call that sent %q", f.num, f.bytes, data)
			}
		default:
			return fmt.Sprintf("answer %d %q to a call that is never answered (%q)", f.num, f.bytes, data)
		}
	case pcRespCancel:
		if !cancelled {
			return "cancel answer to a call that was not cancelled"
		}
	case pcRespDaemonError:
		if !disrupted {
			return fmt.Sprintf("daemon error %q", m.payload)
		}
	default:
		return fmt.Sprintf("answer of kind %d", m.kind)
	}
	return ""
}

// Calls between two daemons with callees that answer late, with errors, twice or never, callers that cancel at
// random moments or leave with calls in flight, a second callee of the protocol (balanced) that removes its
// handler or leaves at random moments, malformed requests from the client: every call of the steady caller gets
// exactly one answer, its own (or cancel once it cancelled, or a daemon error when the callee that had it left),
// and afterwards no call is left in the daemons' tables and no goroutine is left behind.
func TestUnaryCallsUnderRandomCancellationAndDisruption(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := &lockedRand{rng: mrand.New(mrand.NewSource(seed))}
	a, sockA := startUnaryTestDaemon(t)
	b, sockB := startUnaryTestDaemon(t)
	connectDaemons(t, a, b)
	const proto = "/test/echo"

	steadyCallee := &testCallee{c: openPersistent(t, sockB), maxDelay: 30 * time.Millisecond, rng: rng}
	steadyCallee.c.addHandler(t, proto)
	pcB := persistentConnOf(t, b, proto)
	caller := openPersistent(t, sockA)
	caller.addHandler(t, "/test/caller")
	pcA := persistentConnOf(t, a, "/test/caller")
	go steadyCallee.serve()
	router := newCallRouter(caller)
	time.Sleep(100 * time.Millisecond)
	baseline := runtime.NumGoroutine()

	stop := make(chan struct{})
	var background sync.WaitGroup
	background.Add(1)
	go func() { // a second callee that comes and goes
		defer background.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			c := openPersistent(t, sockB)
			c.addHandler(t, proto)
			go func() {
				for m := range c.in {
					if m.kind != pcRespRequestHandling {
						continue
					}
					call, _ := decodeCallUnary(m.payload)
					if rng.Intn(2) == 0 && call.data[0] != 'n' {
						id := []byte(m.callID)
						if call.data[0] == 'e' {
							_ = c.send(unaryResponseMsg(id, append([]byte("err:"), call.data...), true))
						} else {
							_ = c.send(unaryResponseMsg(id, append([]byte("ok:"), call.data...), false))
						}
					}
				}
			}()
			time.Sleep(time.Duration(50+rng.Intn(200)) * time.Millisecond)
			if rng.Intn(2) == 0 {
				_ = c.send(removeHandlerMsg(newCallID(), proto))
				time.Sleep(time.Duration(rng.Intn(50)) * time.Millisecond)
			}
			_ = c.conn.Close()
			<-c.done
		}
	}()
	background.Add(1)
	go func() { // a caller that leaves with calls in flight
		defer background.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			c := openPersistent(t, sockA)
			go func() {
				for range c.in {
				}
			}()
			for i := rng.Intn(20); i > 0; i-- {
				data := []byte(fmt.Sprintf("%c-leaving-%d", "aedn"[rng.Intn(4)], i))
				_ = c.send(callUnaryMsg(newCallID(), b.host.ID(), proto, data))
			}
			time.Sleep(time.Duration(rng.Intn(100)) * time.Millisecond)
			_ = c.conn.Close()
			<-c.done
		}
	}()

	const calls, workers = 300, 16
	var failuresMu sync.Mutex
	var failures []string
	fail := func(format string, args ...interface{}) {
		failuresMu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		failuresMu.Unlock()
	}
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				id := newCallID()
				if i%25 == 0 { // malformed requests of the client: each is answered with a daemon error
					bad := [][]byte{
						appendBytesField(appendBytesField(nil, 1, id), 9, []byte("unknown")),
						appendBytesField(appendBytesField(nil, 1, id), pcReqCallUnary, []byte{0xff}),
						appendBytesField(appendBytesField(nil, 1, id), pcReqAddUnaryHandler, nil),
						callUnaryMsg(id, "not a peer id", proto, []byte("a")),
					}[rng.Intn(4)]
					call := router.expect(id)
					_ = caller.send(bad, unaryResponseMsg(newCallID(), []byte("for nobody"), false), cancelMsg(newCallID()))
					select {
					case m := <-call.first:
						if m.kind != pcRespDaemonError {
							fail("malformed request %x answered with %d %q", bad, m.kind, m.payload)
						}
					case <-time.After(5 * time.Second):
						fail("malformed request %x not answered", bad)
					}
					continue
				}
				data := []byte(fmt.Sprintf("%c-%d", "aedn"[rng.Intn(4)], i))
				call := router.expect(id)
				if err := caller.send(callUnaryMsg(id, b.host.ID(), proto, data)); err != nil {
					fail("send: %v", err)
					return
				}
				cancelled := false
				var cancelAt <-chan time.Time
				if data[0] == 'n' || rng.Intn(4) == 0 {
					cancelAt = time.After(time.Duration(rng.Intn(40)) * time.Millisecond)
				}
				var m pcMessage
			wait:
				for {
					select {
					case m = <-call.first:
						break wait
					case <-cancelAt:
						cancelAt = nil
						cancelled = true
						_ = caller.send(cancelMsg(id))
					case <-time.After(5 * time.Second):
						fail("call %d (%q, cancelled: %v) got no answer in 5 s", i, data, cancelled)
						continue
					}
				}
				// a call the steady callee did not get went to the other one, which may have left with it
				disrupted := !steadyCallee.got(id)
				if problem := checkAnswer(m, data, cancelled, disrupted); problem != "" {
					fail("call %d (%q, cancelled: %v): %s", i, data, cancelled, problem)
				}
			}
		}()
	}
	for i := 0; i < calls; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	close(stop)
	background.Wait()
	steadyCallee.handled.Wait()
	time.Sleep(100 * time.Millisecond) // late second answers, cancels

	router.mu.Lock()
	for id, call := range router.calls {
		if call.count != 1 {
			fail("call %x got %d answers", id, call.count)
		}
	}
	for _, m := range router.unexpected {
		fail("a message of kind %d for call %x that nobody made", m.kind, m.callID)
	}
	router.mu.Unlock()
	deadline := time.Now().Add(3 * time.Second)
	for {
		incomingB, outgoingB := pcB.callCounts()
		incomingA, outgoingA := pcA.callCounts()
		if incomingB+outgoingB+incomingA+outgoingA == 0 {
			break
		}
		if time.Now().After(deadline) {
			fail("calls left in the tables: callee %d incoming, caller %d outgoing", incomingB, outgoingA)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, d := range []*daemon{a, b} {
		d.mu.Lock()
		if h := d.unaryHandlers[protocol.ID(proto)]; d == b && (h == nil || h.len() != 1) {
			fail("the callee's daemon has %v handlers of %s, want the steady one", h, proto)
		}
		if d.persistentConns != 1 { // the steady client
			fail("%d persistent connections left", d.persistentConns)
		}
		d.mu.Unlock()
	}
	if n := settleGoroutines(baseline+5, 5*time.Second); n > baseline+5 {
		fail("%d goroutines after the calls, %d before:\n%s", n, baseline, goroutineDump())
	}
	if len(failures) > 0 {
		if len(failures) > 20 {
			failures = append(failures[:20], fmt.Sprintf("... and %d more", len(failures)-20))
		}
		t.Fatal(strings.Join(failures, "\n"))
	}
	steadyCallee.mu.Lock()
	t.Logf("%d cancels reached the steady callee", steadyCallee.cancels)
	steadyCallee.mu.Unlock()
}

// openStalledHandler registers proto on a persistent connection of its own that then reads nothing more.
func openStalledHandler(t testing.TB, sock, proto string) net.Conn {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	r := bufio.NewReader(conn)
	if err := writeDelimited(conn, appendVarintField(nil, 1, reqPersistentConnUpgrade)); err != nil {
		t.Fatal(err)
	}
	if _, err := readDelimited(r, 1<<20); err != nil {
		t.Fatal(err)
	}
	id := newCallID()
	if err := writeDelimited(conn, addHandlerMsg(id, proto, false)); err != nil {
		t.Fatal(err)
	}
	if answer, err := readDelimited(r, 1<<20); err != nil || !bytes.Equal(answer, encodePersistentResponse(id, 0, nil)) {
		t.Fatalf("adding the handler: %x, %v", answer, err)
	}
	return conn
}

// Requests for a client that reads nothing for a while (its event loop blocked) wait to be written to it; those
// whose callers leave meanwhile (a timeout) must not stay behind, each with its goroutine and its request (up to
// -persistentConnMaxMsgSize, no longer counted by the resource manager once the caller's stream is gone).
func TestRequestsForAStalledClientEndWithTheirCallers(t *testing.T) {
	a, sockA := startUnaryTestDaemon(t)
	b, sockB := startUnaryTestDaemon(t)
	connectDaemons(t, a, b)
	const proto = "/test/stalled"
	stalled := openStalledHandler(t, sockB, proto)
	caller := openPersistent(t, sockA)
	router := newCallRouter(caller)
	time.Sleep(100 * time.Millisecond)
	baseline := runtime.NumGoroutine()

	const calls = 100
	data := bytes.Repeat([]byte("x"), 128<<10) // the stalled client's socket buffer fills after a few
	var wg sync.WaitGroup
	for i := 0; i < calls; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := newCallID()
			call := router.expect(id)
			_ = caller.send(callUnaryMsg(id, b.host.ID(), proto, data))
			time.Sleep(200 * time.Millisecond) // the caller's timeout
			_ = caller.send(cancelMsg(id))
			select {
			case <-call.first:
			case <-time.After(5 * time.Second):
				t.Errorf("a cancelled call got no answer")
			}
		}()
	}
	wg.Wait()
	n := settleGoroutines(baseline+10, 3*time.Second)
	_ = stalled.Close()
	if n > baseline+10 {
		t.Fatalf("%d goroutines after %d calls to a stalled client were cancelled, %d before", n, calls, baseline)
	}
}

// What a peer sends on a unary protocol, however malformed or abandoned, ends its stream and leaves nothing in
// the callee's daemon; a request that reuses the call id of one in flight is refused without disturbing it.
func TestMalformedAndAbandonedUnaryStreamsLeaveNothingBehind(t *testing.T) {
	a, _ := startUnaryTestDaemon(t)
	b, sockB := startUnaryTestDaemon(t, "-unaryReadTimeout=300ms", "-persistentConnMaxMsgSize=65536")
	connectDaemons(t, a, b)
	const proto = "/test/raw"
	callee := openPersistent(t, sockB)
	callee.addHandler(t, proto)
	pcB := persistentConnOf(t, b, proto)
	time.Sleep(100 * time.Millisecond)
	baseline := runtime.NumGoroutine()

	request := func(id []byte) []byte {
		var wire []byte
		msg := callUnaryMsg(id, "ignored", proto, []byte("data"))
		wire = append(protowire.AppendVarint(wire, uint64(len(msg))), msg...)
		return wire
	}
	cases := map[string]func(s streamLike){
		"garbage":            func(s streamLike) { _, _ = s.Write([]byte{5, 0xff, 0xff, 0xff, 0xff, 0xff}) },
		"overlong varint":    func(s streamLike) { _, _ = s.Write(bytes.Repeat([]byte{0xff}, 12)) },
		"too large":          func(s streamLike) { _, _ = s.Write(protowire.AppendVarint(nil, 1<<20)) },
		"truncated, stalled": func(s streamLike) { _, _ = s.Write(request(newCallID())[:10]) },
		"truncated, closed": func(s streamLike) {
			_, _ = s.Write(request(newCallID())[:10])
			_ = s.CloseWrite()
		},
		"short call id": func(s streamLike) { _, _ = s.Write(request([]byte("short"))) },
		"not a call": func(s streamLike) {
			msg := cancelMsg(newCallID())
			_, _ = s.Write(append(protowire.AppendVarint(nil, uint64(len(msg))), msg...))
		},
		"bytes behind":         func(s streamLike) { _, _ = s.Write(append(request(newCallID()), 1, 2, 3)) },
		"half-closed":          func(s streamLike) { _, _ = s.Write(request(newCallID())); _ = s.CloseWrite() },
		"reset":                func(s streamLike) { _, _ = s.Write(request(newCallID())); _ = s.Reset() },
		"nothing, closed":      func(s streamLike) { _ = s.CloseWrite() },
		"nothing, stalled":     func(s streamLike) {},
		"request, stalled":     func(s streamLike) { _, _ = s.Write(request(newCallID())) },
		"empty message":        func(s streamLike) { _, _ = s.Write([]byte{0}) },
		"request in pieces":    func(s streamLike) { r := request(newCallID()); _, _ = s.Write(r[:5]); _, _ = s.Write(r[5:]) },
		"two requests at once": func(s streamLike) { _, _ = s.Write(append(request(newCallID()), request(newCallID())...)) },
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for name, send := range cases {
		for i := 0; i < 5; i++ {
			wg.Add(1)
			go func(name string, send func(streamLike)) {
				defer wg.Done()
				s, err := a.host.NewStream(ctx, b.host.ID(), proto)
				if err != nil {
					t.Errorf("%s: %v", name, err)
					return
				}
				send(s)
				// a valid request waits for its answer; anything else ends the stream within the stall timeout
				valid := strings.HasPrefix(name, "request")
				_ = s.SetReadDeadline(time.Now().Add(time.Second))
				n, err := s.Read(make([]byte, 100))
				var ne net.Error
				timedOut := errors.As(err, &ne) && ne.Timeout()
				if n > 0 || err == nil || timedOut != valid {
					t.Errorf("%s: the callee's daemon answered %d bytes, %v", name, n, err)
				}
				_ = s.Reset()
			}(name, send)
		}
	}

	// a request in flight, and another one with its call id
	id := newCallID()
	first, err := a.host.NewStream(ctx, b.host.ID(), proto)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = first.Write(request(id))
	var m pcMessage
	var seen []pcMessage // what the client got meanwhile
	for m.callID != string(id) {
		select {
		case m = <-callee.in:
			seen = append(seen, m)
		case <-ctx.Done():
			t.Fatal("the request in flight did not reach the client")
		}
	}
	second, err := a.host.NewStream(ctx, b.host.ID(), proto)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = second.Write(request(id))
	if n, err := second.Read(make([]byte, 100)); n > 0 || err == nil {
		t.Fatalf("a request with the call id of one in flight was accepted (%d bytes, %v)", n, err)
	}
	if err := callee.send(unaryResponseMsg(id, []byte("first"), false)); err != nil {
		t.Fatal(err)
	}
	answer, err := readDelimited(bufio.NewReader(first), 1<<20)
	if err != nil || !bytes.Equal(answer, unaryResponseMsg(id, []byte("first"), false)) {
		t.Fatalf("the request in flight got %x, %v", answer, err)
	}
	_ = first.Close()
	wg.Wait()

	deadline := time.Now().Add(3 * time.Second)
	for {
		incoming, _ := pcB.callCounts()
		if incoming == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d calls left in the callee's table", incoming)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := settleGoroutines(baseline+5, 5*time.Second); n > baseline+5 {
		t.Fatalf("%d goroutines after the streams ended, %d before:\n%s", n, baseline, goroutineDump())
	}
	// every request the client got, but the one it answered, was cancelled when its caller left
	open := map[string]bool{}
	for len(callee.in) > 0 {
		seen = append(seen, <-callee.in)
	}
	for _, m := range seen {
		if m.callID == string(id) {
			continue
		}
		switch m.kind {
		case pcRespRequestHandling:
			open[m.callID] = true
		case pcRespCancel:
			if !open[m.callID] {
				t.Errorf("a cancel for call %x that was not open", m.callID)
			}
			delete(open, m.callID)
		}
	}
	if len(open) != 0 {
		t.Fatalf("%d requests whose callers left were not cancelled", len(open))
	}
}

type streamLike = interface {
	Write([]byte) (int, error)
	CloseWrite() error
	Reset() error
}

// A message announced above the limit is skipped; one announced beyond what can ever be skipped (2^63 bytes or
// more) ends the connection instead of being skipped as if it were empty (its body then read as the next
// messages).
func TestMessageAnnouncedBeyondAnySkipEndsThePersistentConnection(t *testing.T) {
	_, sock := startUnaryTestDaemon(t, "-persistentConnMaxMsgSize=1024")
	openPersistent(t, sock) // the daemon exits when its last persistent connection closes
	c := openPersistent(t, sock)
	id := newCallID()
	body := removeHandlerMsg(id, "/test/none") // would be answered if it were read as a message
	wire := protowire.AppendVarint(nil, 1<<63+100)
	wire = append(wire, make([]byte, 64)...) // the part read to find a call id
	wire = append(protowire.AppendVarint(wire, uint64(len(body))), body...)
	if _, err := c.conn.Write(wire); err != nil {
		t.Fatal(err)
	}
	select {
	case m, ok := <-c.in:
		if ok {
			t.Fatalf("the body of a message announced at 2^63 bytes was read as a message: kind %d %q", m.kind, m.payload)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the connection is still open")
	}
}
