package main

import (
	"context"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p"
	kad "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

const testRelayID = "12D3KooWHKibLUs5KV6nXFM38SY5e71pr14G2VX65rAQppqwCuyb"

func mustAddrs(t *testing.T, addrs ...string) []ma.Multiaddr {
	t.Helper()
	out := make([]ma.Multiaddr, 0, len(addrs))
	for _, s := range addrs {
		out = append(out, ma.StringCast(s))
	}
	return out
}

func addrStrings(addrs []ma.Multiaddr) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, a.String())
	}
	return out
}

func sameStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// A relay known only by private or loopback addresses (a LAN, or tests on 127.0.0.1) still gives circuit
// addresses; go-libp2p's autorelay would announce none.
func TestCircuitAddrsKeepPrivateRelayAddrs(t *testing.T) {
	relayID, err := peer.Decode(testRelayID)
	if err != nil {
		t.Fatal(err)
	}
	got := addrStrings(circuitAddrs(relayID, mustAddrs(t,
		"/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.1.5/tcp/4001", "/ip4/127.0.0.1/tcp/4001")))
	want := []string{
		"/ip4/127.0.0.1/tcp/4001/p2p/" + testRelayID + "/p2p-circuit",
		"/ip4/192.168.1.5/tcp/4001/p2p/" + testRelayID + "/p2p-circuit",
	}
	if !sameStrings(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// A relay with a public address is announced through public addresses only (no private address leaks), never
// through an address that is itself relayed, and a trailing /p2p/<relay id> is not doubled.
func TestCircuitAddrsPreferPublicAndSkipRelayed(t *testing.T) {
	relayID, err := peer.Decode(testRelayID)
	if err != nil {
		t.Fatal(err)
	}
	got := addrStrings(circuitAddrs(relayID, mustAddrs(t,
		"/ip4/10.0.0.2/tcp/4001",
		"/ip4/8.8.8.8/tcp/4001/p2p/"+testRelayID,
		"/ip4/1.1.1.1/tcp/4001/p2p/"+testRelayID+"/p2p-circuit")))
	want := []string{"/ip4/8.8.8.8/tcp/4001/p2p/" + testRelayID + "/p2p-circuit"}
	if !sameStrings(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// With -autoRelay=1, the address factory returns the base (or -announceAddrs) addresses followed by the circuit
// addresses of the reservations held.
func TestAddrsFactoryAppendsReservedRelayAddrs(t *testing.T) {
	announce := mustAddrs(t, "/ip4/8.8.4.4/tcp/1234")
	d := &daemon{cfg: &config{options: &options{}, announceAddrs: announce}}
	d.relays = newRelayKeeper(d)
	circuit := mustAddrs(t, "/ip4/8.8.8.8/tcp/4001/p2p/"+testRelayID+"/p2p-circuit")
	relayID, _ := peer.Decode(testRelayID)
	d.relays.reservations[relayID] = &relayReservation{renewAt: time.Now().Add(time.Hour), addrs: circuit}

	got := addrStrings(d.addrsFactory()(mustAddrs(t, "/ip4/127.0.0.1/tcp/5555")))
	want := []string{announce[0].String(), circuit[0].String()}
	if !sameStrings(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}

	d.cfg.announceAddrs = nil
	got = addrStrings(d.addrsFactory()(mustAddrs(t, "/ip4/127.0.0.1/tcp/5555")))
	want = []string{"/ip4/127.0.0.1/tcp/5555", circuit[0].String()}
	if !sameStrings(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// The DHT filters keep peers that are reachable only through a relay out of the routing table and out of
// look-ups, and let directly connected peers and peers with direct addresses through.
func TestDHTFiltersSkipRelayOnlyPeers(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	newHost := func() host.Host {
		h, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = h.Close() })
		return h
	}
	self, other := newHost(), newHost()
	instance, err := kad.New(ctx, self, kad.Mode(kad.ModeServer))
	if err != nil {
		t.Fatal(err)
	}
	defer instance.Close()

	circuit := ma.StringCast("/ip4/127.0.0.1/tcp/4001/p2p/" + testRelayID + "/p2p-circuit")
	rtFilter, queryFilter := relayOnlyRTFilter, relayOnlyQueryFilter
	if rtFilter(instance, other.ID()) {
		t.Fatal("a peer we are not connected to passed the routing table filter")
	}
	if queryFilter(instance, peer.AddrInfo{ID: other.ID(), Addrs: []ma.Multiaddr{circuit}}) {
		t.Fatal("a peer with only relay addresses passed the query filter")
	}
	if !queryFilter(instance, peer.AddrInfo{ID: other.ID(), Addrs: append([]ma.Multiaddr{circuit}, other.Addrs()...)}) {
		t.Fatal("a peer with a direct address was filtered out of queries")
	}
	if err := self.Connect(ctx, peer.AddrInfo{ID: other.ID(), Addrs: other.Addrs()}); err != nil {
		t.Fatal(err)
	}
	if !rtFilter(instance, other.ID()) {
		t.Fatal("a directly connected peer was kept out of the routing table")
	}
	if !queryFilter(instance, peer.AddrInfo{ID: other.ID(), Addrs: []ma.Multiaddr{circuit}}) {
		t.Fatal("a directly connected peer was filtered out of queries")
	}
}

// A relay records the circuit address of a peer that reserves a slot with it, restores it when identify replaced
// the peer's addresses, and drops it once the peer disconnects.
func TestReservationHintsFollowReservingPeer(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	relayHost, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay())
	if err != nil {
		t.Fatal(err)
	}
	defer relayHost.Close()
	peerHost, err := libp2p.New(libp2p.ListenAddrStrings("/ip4/127.0.0.1/tcp/0"), libp2p.DisableRelay())
	if err != nil {
		t.Fatal(err)
	}
	defer peerHost.Close()
	if err := peerHost.Connect(ctx, peer.AddrInfo{ID: relayHost.ID(), Addrs: relayHost.Addrs()}); err != nil {
		t.Fatal(err)
	}

	d := &daemon{ctx: ctx, host: relayHost, cfg: &config{options: parseFlags(t)}}
	hints := d.startReservationHints()
	want := circuitAddrs(relayHost.ID(), relayHost.Addrs())
	hasHint := func() bool {
		for _, a := range relayHost.Peerstore().Addrs(peerHost.ID()) {
			if a.Equal(want[0]) {
				return true
			}
		}
		return false
	}
	waitFor := func(cond func() bool, what string) {
		t.Helper()
		deadline := time.Now().Add(3 * reservationHintInterval)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatal(what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	if !hints.AllowReserve(peerHost.ID(), peerHost.Addrs()[0]) {
		t.Fatal("a reservation was refused")
	}
	if !hasHint() {
		t.Fatalf("no circuit address recorded for the reserving peer: %v", relayHost.Peerstore().Addrs(peerHost.ID()))
	}
	relayHost.Peerstore().SetAddrs(peerHost.ID(), want, 0) // as identify does with a message of other addresses
	waitFor(hasHint, "the circuit address was not restored")
	_ = peerHost.Close()
	waitFor(func() bool { return !hasHint() }, "the circuit address outlived the peer's connection")
}
