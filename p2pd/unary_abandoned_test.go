package main

// Requests of peers whose caller or client goes away, stalls or sends garbage leave nothing behind in the daemon.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

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
