package main

// Tests of the relay service's limits: what other peers' relayed connections may take from the node.

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/client"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
	ma "github.com/multiformats/go-multiaddr"
)

// relayedThroughput sends size bytes from one host to another through a relay with the given buffer size and
// returns MB/s.
func relayedThroughput(t *testing.T, bufferSize, size int) float64 {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	newHost := func(opts ...libp2p.Option) host.Host {
		h, err := libp2p.New(append([]libp2p.Option{libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0")}, opts...)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = h.Close() })
		return h
	}
	relayHost := newHost(libp2p.EnableRelay())
	resources := relay.DefaultResources()
	resources.Limit = nil
	resources.BufferSize = bufferSize
	if _, err := relay.New(relayHost, relay.WithResources(resources)); err != nil {
		t.Fatal(err)
	}
	relayInfo := peer.AddrInfo{ID: relayHost.ID(), Addrs: relayHost.Addrs()}
	dst, src := newHost(libp2p.EnableRelay()), newHost(libp2p.EnableRelay())
	done := make(chan int64, 1)
	dst.SetStreamHandler("/bench", func(s network.Stream) {
		n, _ := io.Copy(io.Discard, s)
		_ = s.Close()
		done <- n
	})
	if err := dst.Connect(ctx, relayInfo); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Reserve(ctx, dst, relayInfo); err != nil {
		t.Fatal(err)
	}
	circuit, _ := ma.NewMultiaddr(fmt.Sprintf("%s/p2p/%s/p2p-circuit", relayHost.Addrs()[0], relayHost.ID()))
	if err := src.Connect(ctx, relayInfo); err != nil {
		t.Fatal(err)
	}
	if err := src.Connect(ctx, peer.AddrInfo{ID: dst.ID(), Addrs: []ma.Multiaddr{circuit}}); err != nil {
		t.Fatal(err)
	}
	s, err := src.NewStream(network.WithUseTransient(ctx, "bench"), dst.ID(), "/bench")
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	start := time.Now()
	for sent := 0; sent < size; sent += len(chunk) {
		if _, err := s.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	_ = s.CloseWrite()
	if n := <-done; n != int64(size) {
		t.Fatalf("received %d bytes of %d", n, size)
	}
	return float64(size) / time.Since(start).Seconds() / 1e6
}

// Measurement behind the default -relayBufferSize (REVIEW_RELAY_BENCH=1 go test -run RelayBufferThroughput -v).
func TestRelayBufferThroughput(t *testing.T) {
	if os.Getenv("REVIEW_RELAY_BENCH") == "" {
		t.Skip("set REVIEW_RELAY_BENCH=1 to measure")
	}
	for round := 0; round < 4; round++ {
		for _, size := range []int{16 << 20, 1 << 20, 256 << 10} {
			t.Logf("buffer %8d: %.0f MB/s", size, relayedThroughput(t, size, 512<<20))
		}
	}
}

// fillRelayScope reserves in the relay service's scope what it reserves for each relayed connection, until it is
// refused, and returns how many connections were admitted (the reservations are released when t ends).
func fillRelayScope(t *testing.T, rm network.ResourceManager, bufferSize int) int {
	var relayScope network.ResourceScopeSpan
	if err := rm.ViewService(relay.ServiceName, func(s network.ServiceScope) error {
		var err error
		relayScope, err = s.BeginSpan()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(relayScope.Done)
	circuits := 0
	for ; circuits < 100000; circuits++ {
		span, err := relayScope.BeginSpan()
		if err != nil {
			t.Fatal(err)
		}
		if span.ReserveMemory(2*bufferSize, network.ReservationPriorityHigh) != nil {
			span.Done()
			break
		}
	}
	return circuits
}

// Other peers' relayed connections, however many, leave the node enough of the memory limit to grow the receive
// windows of its own streams (yamux asks for them at priority 128, i.e. while under half of the limit is used).
func TestRelayedConnectionsLeaveMemoryForOwnStreams(t *testing.T) {
	o := parseFlags(t)
	rm, err := newResourceManager(o)
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	circuits := fillRelayScope(t, rm, o.relayBufferSize)
	addr, _ := ma.NewMultiaddr("/ip4/127.0.0.1/tcp/1")
	conn, err := rm.OpenConnection(network.DirOutbound, true, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Done()
	if err := conn.ReserveMemory(16<<20, 128); err != nil {
		t.Fatalf("after %d relayed connections our own stream window cannot grow: %v", circuits, err)
	}
}

// With the default flags a relay still serves a thousand relayed connections at once within its share of memory.
func TestDefaultRelayLimitsAdmitAThousandRelayedConnections(t *testing.T) {
	o := parseFlags(t)
	rm, err := newResourceManager(o)
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	if circuits := fillRelayScope(t, rm, o.relayBufferSize); circuits < 1000 {
		t.Fatalf("only %d relayed connections fit with %d-byte buffers", circuits, o.relayBufferSize)
	}
}

// startTestRelay starts a relay service on 127.0.0.1 with the flags given, and returns its host and address.
func startTestRelay(t *testing.T, ctx context.Context, args ...string) (host.Host, peer.AddrInfo) {
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.EnableRelay())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	d := &daemon{ctx: ctx, host: h, cfg: &config{options: parseFlags(t, args...)}}
	if err := d.startRelayService(); err != nil {
		t.Fatal(err)
	}
	return h, peer.AddrInfo{ID: h.ID(), Addrs: h.Addrs()}
}

// reserveFromNewPeer starts a host that connects to the relay and asks it for a reservation.
func reserveFromNewPeer(t *testing.T, ctx context.Context, relayInfo peer.AddrInfo) (host.Host, error) {
	h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.EnableRelay())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Close() })
	if err := h.Connect(ctx, relayInfo); err != nil {
		t.Fatal(err)
	}
	_, err = client.Reserve(ctx, h, relayInfo)
	return h, err
}

// Reservation slots are those held now: peers that reserved and left (here, throwaway identities) do not keep
// honest peers from reserving. go-libp2p's own count keeps every reservation granted in the last 30 minutes.
func TestRelayReservationSlotsOfPeersThatLeftAreFree(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, relayInfo := startTestRelay(t, ctx, "-relayMaxReservations=2")
	for i := 0; i < 2; i++ {
		h, err := reserveFromNewPeer(t, ctx, relayInfo)
		if err != nil {
			t.Fatal(err)
		}
		_ = h.Close()
	}
	if _, err := reserveFromNewPeer(t, ctx, relayInfo); err != nil {
		t.Fatalf("a reservation was refused although no other peer holds one: %v", err)
	}
}

// Peers that hold reservations use at most -relayMaxReservations slots together.
func TestRelayReservationsAboveTheLimitAreRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, relayInfo := startTestRelay(t, ctx, "-relayMaxReservations=2")
	for i := 0; i < 2; i++ {
		if _, err := reserveFromNewPeer(t, ctx, relayInfo); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reserveFromNewPeer(t, ctx, relayInfo); err == nil {
		t.Fatal("a third reservation was granted with -relayMaxReservations=2")
	}
}

// Peers reserving from one public IPv4 address (or IPv6 /64 network) hold at most a quarter of the slots; private
// addresses (a LAN, 127.0.0.1) have no such limit.
func TestRelayReservationsFromOnePublicAddressAreLimited(t *testing.T) {
	hints := &reservationHints{maxHeld: 8, maxSource: 2, peers: map[peer.ID]reservationHint{}}
	source := func(s string) string { return reservationSource(mustAddrs(t, s)[0]) }
	if a, b := source("/ip6/2001:db8:1:2::1/tcp/1"), source("/ip6/2001:db8:1:2:ffff::9/tcp/2"); a != b || a == "" {
		t.Fatalf("two addresses of one IPv6 /64 network give sources %q and %q", a, b)
	}
	if s := source("/ip4/192.168.1.5/tcp/1"); s != "" {
		t.Fatalf("a private address gives the source %q", s)
	}
	attacker, other := source("/ip4/1.2.3.4/tcp/1"), source("/ip4/5.6.7.8/tcp/1")
	for i := 0; i < 2; i++ {
		if !hints.admit(peer.ID(fmt.Sprint("attacker-", i)), attacker) {
			t.Fatalf("reservation %d from one public address was refused", i)
		}
	}
	if hints.admit("attacker-2", attacker) {
		t.Fatal("a third reservation from one public address was granted with maxSource=2")
	}
	if !hints.admit("attacker-0", attacker) {
		t.Fatal("a renewal was refused")
	}
	for i := 0; i < 3; i++ {
		if !hints.admit(peer.ID(fmt.Sprint("lan-", i)), "") {
			t.Fatalf("reservation %d from a private address was refused", i)
		}
	}
	if !hints.admit("honest", other) {
		t.Fatal("a reservation from another public address was refused")
	}
}

// The relay keeper forgets relays whose back-off after a failed reservation has passed, instead of keeping an
// entry for every relay that ever failed.
func TestRelayKeeperForgetsPassedBackoffs(t *testing.T) {
	d := &daemon{cfg: &config{options: &options{}}}
	k := newRelayKeeper(d)
	now := time.Now()
	for i := 0; i < 100; i++ {
		k.backoff[peer.ID(fmt.Sprint("failed-relay-", i))] = now.Add(-time.Second)
	}
	k.backoff["recent"] = now.Add(time.Minute)
	k.candidates(now, 1)
	if len(k.backoff) != 1 {
		t.Fatalf("%d back-off entries kept, want 1 (the one not yet passed)", len(k.backoff))
	}
}

// Relay service limits of 0 or below are refused at start-up, with the flag's name.
func TestRelayServiceFlagsMustBePositive(t *testing.T) {
	if err := checkRelayServiceOptions(parseFlags(t)); err != nil {
		t.Fatalf("the defaults are refused: %v", err)
	}
	for _, flag := range []string{"relayMaxCircuits", "relayMaxReservations", "relayBufferSize", "relayDataLimit"} {
		err := checkRelayServiceOptions(parseFlags(t, "-"+flag+"=0"))
		if err == nil || !strings.Contains(err.Error(), flag) {
			t.Fatalf("-%s=0: got %v", flag, err)
		}
	}
	if err := checkRelayServiceOptions(parseFlags(t, "-relayTimeLimit=0s")); err == nil {
		t.Fatal("-relayTimeLimit=0s was accepted")
	}
}
