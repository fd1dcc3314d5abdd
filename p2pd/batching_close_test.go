package main

import (
	"net"
	"testing"
	"time"
)

// Closing a batched TLS connection while a write of it is stuck (the peer reads nothing) breaks that write at once,
// as crypto/tls does with a Write of its own in flight. The batch reaches the socket after the TLS Write returned,
// so TLS saw no write in flight and sent its close_notify alert, which waited behind the stuck batch for the 5 s
// TLS gives it: every yamux session closed over a stalled connection (keepalive failure, DISCONNECT, shutdown)
// took 5 s, its streams waiting as long.
func TestCloseBreaksAStalledBatchedWrite(t *testing.T) {
	a, b := net.Pipe()
	secA, secB := tlsPair(t, newFaultConn(a, 1), newFaultConn(b, 2))
	defer secB.Close()
	conn, ok := secA.(*batchedSecureConn)
	if !ok {
		t.Fatalf("the batching TLS transport made a %T", secA)
	}
	written := make(chan error, 1)
	go func() {
		_, err := conn.WriteBuffers(make([]byte, 12), make([]byte, 200<<10))
		written <- err
	}()
	time.Sleep(100 * time.Millisecond) // the peer reads nothing: the batch cannot be written
	select {
	case err := <-written:
		t.Fatalf("the write returned (%v) although the peer reads nothing", err)
	default:
	}
	start := time.Now()
	closed := make(chan error, 1)
	go func() { closed <- conn.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(time.Second):
		<-closed
		t.Fatalf("Close waited %v for the stuck write (plain TLS returns at once)", time.Since(start))
	}
	select {
	case err := <-written:
		if err == nil {
			t.Fatal("a write broken by Close reported success")
		}
	case <-time.After(time.Second):
		t.Fatal("the stuck write did not end with Close")
	}
}
