package main

import (
	"context"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	ma "github.com/multiformats/go-multiaddr"
)

func TestDialBackoffFlags(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		base    time.Duration
		max     time.Duration
		wantErr string
	}{
		{nil, time.Second, 10 * time.Second, ""},
		{[]string{"-dialBackoffBase=0"}, 0, 10 * time.Second, ""},
		{[]string{"-dialBackoffBase=5s", "-dialBackoffMax=5m"}, 5 * time.Second, 5 * time.Minute, ""},
		{[]string{"-dialBackoffBase=-1s"}, 0, 0, "-dialBackoffBase must not be negative"},
		{[]string{"-dialBackoffMax=0"}, 0, 0, "-dialBackoffMax must be positive"},
		{[]string{"-dialBackoffBase=20s"}, 0, 0, "at least -dialBackoffBase"},
	} {
		o := &options{}
		if err := newFlagSet(o).Parse(tc.args); err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		_, err := buildConfig(o)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("%v: got error %v, want one containing %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if o.dialBackoffBase != tc.base || o.dialBackoffMax != tc.max {
			t.Fatalf("%v: got base %s max %s", tc.args, o.dialBackoffBase, o.dialBackoffMax)
		}
	}
}

func newRedialTestHost(t *testing.T, key crypto.PrivKey, listen ma.Multiaddr) host.Host {
	t.Helper()
	opts := []libp2p.Option{libp2p.NoListenAddrs}
	if key != nil {
		opts = []libp2p.Option{libp2p.Identity(key), libp2p.ListenAddrs(listen)}
	}
	h, err := libp2p.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	return h
}

// A peer that restarts on the same identity and address is dialled again by a request of the client once the
// base has passed since the client's last failed dial, although the swarm's own backoff for it is much longer.
func TestClientRequestRedialsRestartedPeer(t *testing.T) {
	saved := []time.Duration{swarm.BackoffBase, swarm.BackoffCoef, swarm.BackoffMax}
	t.Cleanup(func() { swarm.BackoffBase, swarm.BackoffCoef, swarm.BackoffMax = saved[0], saved[1], saved[2] })
	const redialAfter = 200 * time.Millisecond
	applyDialBackoff(redialAfter, time.Minute)
	key, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	server := newRedialTestHost(t, key, ma.StringCast("/ip4/127.0.0.1/tcp/0"))
	info := peer.AddrInfo{ID: server.ID(), Addrs: server.Addrs()}
	raw := newRedialTestHost(t, nil, nil)
	client := newRedialHost(raw, redialAfter).(*redialHost)
	now := time.Now()
	client.now = func() time.Time { return now }
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if err := client.Connect(ctx, info); err != nil {
		t.Fatal(err)
	}
	_ = server.Close()
	for raw.Network().Connectedness(info.ID) == network.Connected {
		if ctx.Err() != nil {
			t.Fatal("the connection to the closed server is still open")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := client.Connect(ctx, info); err == nil || strings.Contains(err.Error(), "dial backoff") {
		t.Fatalf("the first dial to the closed server should have been tried and refused, got %v", err)
	}
	// libp2p's own dials failed many times too: the swarm now backs off for 200 ms * (1 + 5²)
	for i := 0; i < 6; i++ {
		raw.Network().(*swarm.Swarm).Backoff().AddBackoff(info.ID, info.Addrs[0])
	}

	newRedialTestHost(t, key, info.Addrs[0])
	if err := client.Connect(ctx, info); err == nil || !strings.Contains(err.Error(), "dial backoff") {
		t.Fatalf("a request right after a failed dial should be refused by the backoff, got %v", err)
	}
	now = now.Add(redialAfter)
	if err := client.Connect(ctx, info); err != nil {
		t.Fatalf("a request after the base should dial the restarted server: %v", err)
	}
	if len(client.failed) != 0 {
		t.Fatalf("the server should be forgotten once connected, got %v", client.failed)
	}
}
