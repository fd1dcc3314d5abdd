package main

// Stream handlers of a client that went away without removing them are forgotten (gonehandlers.go).

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
)

// streamHandlerCount is how many clients the daemon has registered for proto.
func streamHandlerCount(d *daemon, proto string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if handlers, ok := d.streamHandlers[protocol.ID(proto)]; ok {
		return handlers.len()
	}
	return 0
}

func TestGoneClientFreesItsProtocol(t *testing.T) {
	server, sock := startUnaryTestDaemon(t)
	for _, removeFile := range []bool{false, true} { // killed (file left, nobody listens), or its file removed too
		l := registerTestHandler(t, sock, "/gone")
		path := l.Addr().String()
		_ = l.Close() // a unix listener removes its file on close
		if !removeFile {
			if f, err := os.Create(path); err == nil { // a plain file in its place: connecting is refused
				_ = f.Close()
			}
		}
		if got := streamHandlerCount(server, "/gone"); got != 1 {
			t.Fatalf("%d handlers of /gone before the next registration, want 1", got)
		}
		// the next registration from another client succeeds (registerTestHandler fails the test otherwise)
		next := registerTestHandler(t, sock, "/gone")
		if got := streamHandlerCount(server, "/gone"); got != 1 {
			t.Fatalf("%d handlers of /gone after it was registered again, want 1", got)
		}
		_ = next.Close()
		_ = os.Remove(filepath.Clean(path))
	}
	// a live holder keeps its protocol (and is merely probed)
	live := registerTestHandler(t, sock, "/held")
	defer live.Close()
	go func() { // the probe's connection is accepted and dropped, as a client does with a stream without StreamInfo
		for {
			conn, err := live.Accept()
			if err != nil {
				return
			}
			_ = conn.Close()
		}
	}()
	dir := t.TempDir()
	other, err := ma.NewMultiaddr("/unix" + filepath.Join(dir, "other.sock"))
	if err != nil {
		t.Fatal(err)
	}
	inner := appendStringField(appendBytesField(nil, 1, other.Bytes()), 2, "/held")
	_, _, resp := controlRequest(t, sock, appendBytesField(appendVarintField(nil, 1, reqStreamHandler), 4, inner))
	if bytes.Equal(resp, encodeOKResponse()) || !bytes.Contains(resp, []byte("already set")) {
		t.Fatalf("a second holder of /held was answered %q, want 'already set'", resp)
	}
}

func TestIncomingStreamSkipsGoneClient(t *testing.T) {
	server, sock := startUnaryTestDaemon(t)
	remote, _ := startUnaryTestDaemon(t)
	connectDaemons(t, remote, server)
	gone := registerTestHandler(t, sock, "/skip")
	_ = gone.Close()
	if got := streamHandlerCount(server, "/skip"); got != 1 {
		t.Fatalf("%d handlers of /skip, want 1", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := remote.host.NewStream(ctx, server.host.ID(), "/skip")
	if err == nil {
		_, _ = s.Write([]byte("x"))
		_ = s.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = s.Read(make([]byte, 1)) // reset: nobody serves /skip any more
		_ = s.Reset()
	}
	deadline := time.Now().Add(5 * time.Second)
	for streamHandlerCount(server, "/skip") != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := streamHandlerCount(server, "/skip"); got != 0 {
		t.Fatalf("%d handlers of /skip after a stream found its client gone, want 0", got)
	}
}

func TestSweepForgetsClientsWhoseSocketIsGone(t *testing.T) {
	old := goneClientsSweepInterval.Load()
	goneClientsSweepInterval.Store(int64(20 * time.Millisecond))
	t.Cleanup(func() { goneClientsSweepInterval.Store(old) })
	server, sock := startUnaryTestDaemon(t)
	live := registerTestHandler(t, sock, "/live")
	defer live.Close()
	gone := registerTestHandler(t, sock, "/unique")
	_ = gone.Close() // its file goes with it; nobody calls or registers /unique again
	deadline := time.Now().Add(5 * time.Second)
	for streamHandlerCount(server, "/unique") != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := streamHandlerCount(server, "/unique"); got != 0 {
		t.Fatalf("%d handlers of /unique after its client's socket was removed, want 0", got)
	}
	time.Sleep(100 * time.Millisecond) // several more sweeps
	if got := streamHandlerCount(server, "/live"); got != 1 {
		t.Fatalf("%d handlers of /live, want 1: a live client is kept", got)
	}
}

// A unary registration probes the stream client holding its name as a stream registration does: before, it was
// refused ("already set") until the sweep found the client's socket file removed, which a killed process never does.
func TestGoneStreamClientFreesItsProtocolForUnary(t *testing.T) {
	server, sock := startUnaryTestDaemon(t)
	l := registerTestHandler(t, sock, "/gone-unary")
	path := l.Addr().String()
	_ = l.Close()
	if f, err := os.Create(path); err == nil { // the file a killed process leaves: connecting is refused
		_ = f.Close()
	}
	defer os.Remove(path)
	pc := openPersistent(t, sock)
	for _, balanced := range []bool{false, true} {
		id := newCallID()
		if err := pc.send(addHandlerMsg(id, "/gone-unary", balanced)); err != nil {
			t.Fatal(err)
		}
		if m := pc.waitFor(t, id, 5*time.Second); m.kind != 0 {
			t.Fatalf("unary registration (balanced=%v) of a name held by a gone stream client: %d %q",
				balanced, m.kind, m.payload)
		}
		if got := streamHandlerCount(server, "/gone-unary"); got != 0 {
			t.Fatalf("%d stream handlers of /gone-unary, want 0", got)
		}
	}
	// a live stream holder keeps its name, and the refusal names it
	live := registerTestHandler(t, sock, "/held-unary")
	defer live.Close()
	go func() {
		for {
			conn, err := live.Accept()
			if err != nil {
				return
			}
			_ = conn.Close()
		}
	}()
	id := newCallID()
	if err := pc.send(addHandlerMsg(id, "/held-unary", false)); err != nil {
		t.Fatal(err)
	}
	m := pc.waitFor(t, id, 5*time.Second)
	holder := []byte(live.Addr().String())
	if m.kind == 0 || !bytes.Contains(m.payload, []byte("already set")) || !bytes.Contains(m.payload, holder) {
		t.Fatalf("a unary registration of /held-unary, held by a live stream client, was answered %d %q", m.kind, m.payload)
	}
	if got := streamHandlerCount(server, "/held-unary"); got != 1 {
		t.Fatalf("%d stream handlers of /held-unary, want 1", got)
	}
}
