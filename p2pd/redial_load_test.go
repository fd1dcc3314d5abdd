package main

import (
	"context"
	"crypto/rand"
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

func randomPeerID(t *testing.T) peer.ID {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// Many concurrent client requests to a peer whose address accepts TCP but fails every handshake dial it about once
// per base, not once per request: the daemon never dials such a peer in a loop.
func TestConcurrentRequestsToBrokenPeerDialOncePerBase(t *testing.T) {
	saved := []time.Duration{swarm.BackoffBase, swarm.BackoffCoef, swarm.BackoffMax}
	t.Cleanup(func() { swarm.BackoffBase, swarm.BackoffCoef, swarm.BackoffMax = saved[0], saved[1], saved[2] })
	// (the swarm's own backoff runs on the real clock: with a short base, a slow machine let it expire between two
	// bursts, and the second one dialled; the host's base runs on the test's clock, so a long one costs no time)
	const base = 10 * time.Second
	applyDialBackoff(base, time.Minute)

	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	var accepted atomic.Int64
	go func() {
		for {
			c, err := listener.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			_ = c.Close()
		}
	}()
	addr, err := ma.NewMultiaddr("/ip4/127.0.0.1/tcp/" + strconv.Itoa(listener.Addr().(*net.TCPAddr).Port))
	if err != nil {
		t.Fatal(err)
	}
	info := peer.AddrInfo{ID: randomPeerID(t), Addrs: []ma.Multiaddr{addr}}
	client := newRedialHost(newRedialTestHost(t, nil, nil), base).(*redialHost)
	var mu sync.Mutex
	now := time.Now()
	client.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }

	// burst returns how many of its 64 requests were refused by the dial backoff (they did not dial)
	burst := func() int64 {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var wg sync.WaitGroup
		var refused atomic.Int64
		for i := 0; i < 64; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := client.Connect(ctx, info)
				if err == nil {
					t.Error("a dial to a peer that fails every handshake succeeded")
				} else if errors.Is(err, swarm.ErrDialBackoff) {
					refused.Add(1)
				}
			}()
		}
		wg.Wait()
		return refused.Load()
	}
	burst()
	first := settled(&accepted)
	if first < 1 || first > 3 {
		t.Fatalf("64 concurrent requests dialled the broken peer %d times, want about once", first)
	}
	t.Logf("first burst: %d dials", first)
	// within the base: every request is refused by the backoff. (Counted by the refusals, not by the listener: on a
	// loaded machine a connection of the first burst was once accepted only after the count had settled.)
	if refused := burst(); refused != 64 {
		t.Fatalf("requests within the base dialled the broken peer: %d of 64 were refused by the backoff", refused)
	}
	first = settled(&accepted)
	mu.Lock()
	now = now.Add(base)
	mu.Unlock()
	burst()
	if n := settled(&accepted) - first; n < 1 || n > 3 {
		t.Fatalf("64 concurrent requests after the base dialled the broken peer %d times, want about once", n)
	}
}

// settled returns the count once it has not changed for 200 ms (at most 5 s): a connection whose dial already
// failed on the client's side may still wait in the listener's backlog for the accepting goroutine, more so on a
// loaded machine, and would otherwise be counted in the next burst.
func settled(count *atomic.Int64) int64 {
	last, since := count.Load(), time.Now()
	for give := time.Now().Add(5 * time.Second); time.Now().Before(give); time.Sleep(20 * time.Millisecond) {
		if n := count.Load(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) >= 200*time.Millisecond {
			break
		}
	}
	return last
}

// The failures the host remembers stay bounded however many distinct peers the client fails to reach.
func TestRedialHostForgetsOldFailures(t *testing.T) {
	const base = time.Second
	client := newRedialHost(newRedialTestHost(t, nil, nil), base).(*redialHost)
	now := time.Now()
	client.now = func() time.Time { return now }
	ctx := context.Background()
	for i := 0; i < redialPruneAt+512; i++ {
		if i%256 == 0 {
			now = now.Add(base)
		}
		if client.Connect(ctx, peer.AddrInfo{ID: randomPeerID(t)}) == nil {
			t.Fatal("a peer without addresses was reached")
		}
	}
	if n := len(client.failed); n > redialPruneAt+256 {
		t.Fatalf("the host remembers %d failed peers, want at most %d", n, redialPruneAt+256)
	}
}
