package main

// Unit tests of the resource manager's limits and their flags (no network).

import (
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	ma "github.com/multiformats/go-multiaddr"
)

func parseFlags(t *testing.T, args ...string) *options {
	t.Helper()
	o := &options{}
	if err := newFlagSet(o).Parse(args); err != nil {
		t.Fatal(err)
	}
	return o
}

func TestLimitFlagsReachTheLimiter(t *testing.T) {
	o := parseFlags(t, "-limitStreamsPerPeer=7", "-limitConnsPerPeer=3", "-limitConns=100",
		"-limitMemoryPerPeer=1000000", "-limitMemoryPerConn=500000", "-limitMemory=9000000")
	limiter := rcmgr.NewFixedLimiter(resourceLimits(o))
	p := limiter.GetPeerLimits(peer.ID("somebody"))
	if p.GetStreamLimit(network.DirInbound) != 7 || p.GetStreamLimit(network.DirOutbound) != 7 ||
		p.GetStreamTotalLimit() != 14 || p.GetConnTotalLimit() != 3 || p.GetMemoryLimit() != 1000000 {
		t.Fatalf("peer limits: %+v", p)
	}
	if c := limiter.GetConnLimits(); c.GetMemoryLimit() != 500000 {
		t.Fatalf("connection limits: %+v", c)
	}
	s := limiter.GetSystemLimits()
	if s.GetConnLimit(network.DirInbound) != 100 || s.GetConnLimit(network.DirOutbound) != 100 ||
		s.GetMemoryLimit() != 9000000 || s.GetStreamTotalLimit() != math.MaxInt {
		t.Fatalf("system limits: %+v", s)
	}
	if tr := limiter.GetTransientLimits(); tr.GetStreamLimit(network.DirInbound) != transientStreams ||
		tr.GetConnLimit(network.DirInbound) != transientConns {
		t.Fatalf("transient limits: %+v", tr)
	}
	// what the flags do not name stays unlimited: protocols, services, a single stream
	if limiter.GetProtocolLimits("/ipfs/kad/1.0.0").GetStreamTotalLimit() != math.MaxInt ||
		limiter.GetStreamLimits(peer.ID("somebody")).GetMemoryLimit() != math.MaxInt64 {
		t.Fatal("limits the flags do not name must be unlimited")
	}
}

func TestDefaultLimitsAndTheirValidation(t *testing.T) {
	o := parseFlags(t)
	if !o.resourceLimits || o.limitStreamsPerPeer != defaultLimitStreamsPerPeer || o.unaryReadTimeout != time.Minute {
		t.Fatalf("defaults: %+v", o)
	}
	if err := checkLimitOptions(o); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"-limitStreamsPerPeer=0", "-limitMemoryPerPeer=-1", "-unaryReadTimeout=0s"} {
		err := checkLimitOptions(parseFlags(t, bad))
		name := strings.SplitN(bad, "=", 2)[0]
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Fatalf("%s: want an error naming the flag, got %v", bad, err)
		}
	}
}

func TestResourceLimitsCanBeTurnedOff(t *testing.T) {
	rm, err := newResourceManager(parseFlags(t, "-resourceLimits=0"))
	if err != nil {
		t.Fatal(err)
	}
	if _, isNull := rm.(*network.NullResourceManager); !isNull {
		t.Fatalf("want the null resource manager, got %T", rm)
	}
	rm, err = newResourceManager(parseFlags(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	if _, isNull := rm.(*network.NullResourceManager); isNull {
		t.Fatal("the resource manager must be on by default")
	}
}

// The limiter as go-libp2p applies it: the streams of one peer beyond the limit are refused, another peer's not.
func TestStreamsPerPeerAreRefusedAboveTheLimit(t *testing.T) {
	rm, err := newResourceManager(parseFlags(t, "-limitStreamsPerPeer=3"))
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	for i := 0; i < 3; i++ {
		if _, err := rm.OpenStream(peer.ID("attacker"), network.DirInbound); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
	if _, err := rm.OpenStream(peer.ID("attacker"), network.DirInbound); err == nil {
		t.Fatal("the fourth inbound stream of one peer must be refused")
	}
	if _, err := rm.OpenStream(peer.ID("honest"), network.DirInbound); err != nil {
		t.Fatalf("another peer's stream: %v", err)
	}
}

// Inbound streams that never negotiate a protocol (a few peer ids suffice) and inbound connections that stall in
// their handshake (no peer id needed) fill the transient scope; the daemon's own streams and dials pass through
// that scope too and must still open, else strangers cut the node off from every peer it calls.
func TestStrangersFillingTheTransientScopeDoNotBlockOurOwnStreamsAndDials(t *testing.T) {
	rm, err := newResourceManager(parseFlags(t))
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	for i := 0; i < transientStreams; i++ {
		attacker := peer.ID(fmt.Sprintf("attacker-%d", i/defaultLimitStreamsPerPeer))
		if _, err := rm.OpenStream(attacker, network.DirInbound); err != nil {
			t.Fatalf("inbound stream %d: %v", i, err)
		}
	}
	if _, err := rm.OpenStream(peer.ID("stranger"), network.DirInbound); err == nil {
		t.Fatal("inbound streams before protocol negotiation must stay bounded")
	}
	if _, err := rm.OpenStream(peer.ID("honest"), network.DirOutbound); err != nil {
		t.Fatalf("our own stream was refused while strangers fill the transient scope: %v", err)
	}

	endpoint := ma.StringCast("/ip4/127.0.0.1/tcp/1")
	for i := 0; i < transientConns; i++ {
		if _, err := rm.OpenConnection(network.DirInbound, true, endpoint); err != nil {
			t.Fatalf("inbound connection %d: %v", i, err)
		}
	}
	if _, err := rm.OpenConnection(network.DirInbound, true, endpoint); err == nil {
		t.Fatal("inbound connections in their handshake must stay bounded")
	}
	if _, err := rm.OpenConnection(network.DirOutbound, true, endpoint); err != nil {
		t.Fatalf("our own dial was refused while strangers fill the transient scope: %v", err)
	}
}

// Peers that hold the most inbound connections the daemon accepts do not stop its own dials either.
func TestStrangersHoldingEveryInboundConnectionDoNotBlockOurOwnDials(t *testing.T) {
	rm, err := newResourceManager(parseFlags(t, "-limitConns=64", "-limitConnsPerPeer=4"))
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	endpoint := ma.StringCast("/ip4/127.0.0.1/tcp/1")
	for i := 0; i < 64; i++ {
		scope, err := rm.OpenConnection(network.DirInbound, true, endpoint)
		if err != nil {
			t.Fatalf("inbound connection %d: %v", i, err)
		}
		if err := scope.SetPeer(peer.ID(fmt.Sprintf("attacker-%d", i/4))); err != nil {
			t.Fatalf("inbound connection %d: %v", i, err)
		}
	}
	if _, err := rm.OpenConnection(network.DirInbound, true, endpoint); err == nil {
		t.Fatal("inbound connections must stay bounded by -limitConns")
	}
	if _, err := rm.OpenConnection(network.DirOutbound, true, endpoint); err != nil {
		t.Fatalf("our own dial was refused while strangers hold every inbound connection: %v", err)
	}
}
