package main

import (
	"testing"
	"time"

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
