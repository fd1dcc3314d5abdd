package main

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

// A peer's request handed on to the client is no longer counted in the stream's scope (its reservation is
// released), so the daemon must not keep it while the client handles it: the handler of a long call held it
// (its call id, a slice of the request, was kept for the cancel answer), up to -persistentConnMaxMsgSize per
// call, uncounted.
func TestRequestHandedOnToTheClientIsNotKept(t *testing.T) {
	a, _ := startUnaryTestDaemon(t)
	b, sockB := startUnaryTestDaemon(t)
	connectDaemons(t, a, b)
	const proto = "/test/handed-on"

	// the client reads every request and answers none (a long call)
	conn, err := net.Dial("unix", sockB)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	if err := writeDelimited(conn, appendVarintField(nil, 1, reqPersistentConnUpgrade)); err != nil {
		t.Fatal(err)
	}
	if _, err := readDelimited(r, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := writeDelimited(conn, addHandlerMsg(newCallID(), proto, false)); err != nil {
		t.Fatal(err)
	}
	if _, err := readDelimited(r, 1<<20); err != nil {
		t.Fatal(err)
	}
	var received atomic.Int32
	go func() {
		for {
			if _, err := readDelimited(r, 64<<20); err != nil {
				return
			}
			received.Add(1)
		}
	}()

	heap := func() uint64 {
		var m runtime.MemStats
		for i := 0; i < 3; i++ {
			runtime.GC()
		}
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()

	const calls, size = 16, 3 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i := 0; i < calls; i++ {
		s, err := a.host.NewStream(ctx, b.host.ID(), proto)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Reset()
		msg := callUnaryMsg(newCallID(), "ignored", proto, bytes.Repeat([]byte{byte(i)}, size))
		if _, err := s.Write(append(protowire.AppendVarint(nil, uint64(len(msg))), msg...)); err != nil {
			t.Fatal(err)
		}
	}
	for received.Load() < calls {
		if ctx.Err() != nil {
			t.Fatalf("the client got %d of %d requests", received.Load(), calls)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	after := heap()
	if grown := int64(after) - int64(before); grown > calls*size/2 {
		t.Fatalf("the heap holds %d MiB more with %d requests of %d MiB handed on to the client", grown>>20,
			calls, size>>20)
	}
}
