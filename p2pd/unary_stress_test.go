package main

// Stress tests of the persistent-connection unary protocol with real daemons in this process: two daemons on
// loopback TCP, clients speaking the control protocol over their unix sockets as hivemind's persistent.py does.

import (
	"bytes"
	"fmt"
	mrand "math/rand"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/protocol"
)

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
