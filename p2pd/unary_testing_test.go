package main

// Helpers of the persistent-connection unary tests: two daemons in this process on loopback TCP, and clients
// speaking the control protocol over their unix sockets as hivemind's persistent.py does.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
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
