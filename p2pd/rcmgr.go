package main

// The libp2p resource manager: limits on connections, streams and accounted memory that an honest swarm never
// reaches but that stop one peer from making the daemon hold unbounded state. The limits and the flags that
// change them are documented in README.md ("Limits").

import (
	"flag"
	"fmt"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/protocol/circuitv2/relay"
)

// Defaults of the -limit* flags.
const (
	defaultLimitConns          = 4096
	defaultLimitConnsPerPeer   = 16
	defaultLimitStreamsPerPeer = 1024
	defaultLimitMemory         = 4 << 30
	defaultLimitMemoryPerPeer  = 1 << 30
	defaultLimitMemoryPerConn  = 512 << 20
	// transientConns and transientStreams bound inbound connections still in their handshake and inbound streams
	// that have not yet negotiated a protocol, all peers together: peers that open them and stop there tie up at
	// most this many. Our own dials and streams also pass through this scope (for one round trip) but are not
	// counted against these limits, so strangers filling them cannot stop the node from calling its peers.
	transientConns   = 1024
	transientStreams = 4096
	// relayMemoryShare: the relay service's circuit buffers may use 1/relayMemoryShare of -limitMemory.
	relayMemoryShare = 4
	// defaultUnaryReadTimeout: a peer that stops sending in the middle of a unary request is dropped after this.
	defaultUnaryReadTimeout = 60 * time.Second
)

// resourceLimits turns the -limit* flags into a limit configuration; everything they do not name is unlimited
// (the operating system still limits file descriptors).
//
// What the memory limits count: yamux reserves 256 KiB per open stream and every growth of a stream's receive
// window in its connection's scope (a refused growth only keeps the window smaller), the relay service reserves
// its circuit buffers, and the daemon reserves the buffer of every unary request or answer it reads, in the
// stream's scope, as the buffer grows, and every answer it writes to a peer's call until it has left. A
// reservation above a limit fails: a new stream is refused, a unary message is dropped.
func resourceLimits(o *options) rcmgr.ConcreteLimitConfig {
	perPeerStreams := rcmgr.LimitVal(o.limitStreamsPerPeer)
	partial := rcmgr.PartialLimitConfig{
		// Only the directions are bounded, not their sum: what remote peers open must not use up what the
		// daemon needs for its own dials and streams (outbound ones are started by the trusted local client).
		System: rcmgr.ResourceLimits{
			ConnsInbound:  rcmgr.LimitVal(o.limitConns),
			ConnsOutbound: rcmgr.LimitVal(o.limitConns),
			Memory:        rcmgr.LimitVal64(o.limitMemory),
		},
		Transient: rcmgr.ResourceLimits{
			StreamsInbound: transientStreams,
			ConnsInbound:   transientConns,
		},
		PeerDefault: rcmgr.ResourceLimits{
			Streams:         2 * perPeerStreams,
			StreamsInbound:  perPeerStreams,
			StreamsOutbound: perPeerStreams,
			Conns:           rcmgr.LimitVal(o.limitConnsPerPeer),
			ConnsInbound:    rcmgr.LimitVal(o.limitConnsPerPeer),
			ConnsOutbound:   rcmgr.LimitVal(o.limitConnsPerPeer),
			Memory:          rcmgr.LimitVal64(o.limitMemoryPerPeer),
		},
		Conn: rcmgr.ResourceLimits{Memory: rcmgr.LimitVal64(o.limitMemoryPerConn)},
		// The relay service reserves the buffers of every circuit it relays in its own scope, not in the relayed
		// peers' ones (at high priority: up to 80% of the total); a few identities opening idle circuits would
		// otherwise leave the node's own streams unable to grow their windows (which needs under 50% in use).
		Service: map[string]rcmgr.ResourceLimits{
			relay.ServiceName: {Memory: rcmgr.LimitVal64(o.limitMemory / relayMemoryShare)},
		},
	}
	return partial.Build(rcmgr.InfiniteLimits)
}

// newResourceManager returns go-libp2p's resource manager with the limits of the flags, or the null manager
// (no limits, no accounting) with -resourceLimits=0.
func newResourceManager(o *options) (network.ResourceManager, error) {
	if !o.resourceLimits {
		return &network.NullResourceManager{}, nil
	}
	rm, err := rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(resourceLimits(o)))
	if err != nil {
		return nil, fmt.Errorf("cannot start the resource manager: %v", err)
	}
	return rm, nil
}

// checkLimitOptions validates the -limit* flags: every limit must be positive (0 would block everything).
func checkLimitOptions(o *options) error {
	for _, l := range []struct {
		name  string
		value int64
	}{
		{"limitConns", int64(o.limitConns)},
		{"limitConnsPerPeer", int64(o.limitConnsPerPeer)},
		{"limitStreamsPerPeer", int64(o.limitStreamsPerPeer)},
		{"limitMemory", o.limitMemory},
		{"limitMemoryPerPeer", o.limitMemoryPerPeer},
		{"limitMemoryPerConn", o.limitMemoryPerConn},
	} {
		if l.value <= 0 {
			return fmt.Errorf("-%s must be positive, got %d (use -resourceLimits=0 to turn all limits off)",
				l.name, l.value)
		}
	}
	if o.unaryReadTimeout <= 0 {
		return fmt.Errorf("-unaryReadTimeout must be positive, got %s", o.unaryReadTimeout)
	}
	return nil
}

// addLimitFlags declares the flags of the limits (hivemind additions; the original daemon has no limits).
func addLimitFlags(fs *flag.FlagSet, o *options) {
	fs.DurationVar(&o.unaryReadTimeout, "unaryReadTimeout", defaultUnaryReadTimeout,
		"a peer's unary request (or answer) is dropped when none of its bytes arrive for this long")
	fs.BoolVar(&o.resourceLimits, "resourceLimits", true,
		"enables the resource manager with the -limit* limits (0: no limits, as in the original daemon)")
	fs.IntVar(&o.limitConns, "limitConns", defaultLimitConns,
		"max connections, all peers together, in each direction")
	fs.IntVar(&o.limitConnsPerPeer, "limitConnsPerPeer", defaultLimitConnsPerPeer, "max connections to one peer")
	fs.IntVar(&o.limitStreamsPerPeer, "limitStreamsPerPeer", defaultLimitStreamsPerPeer,
		"max open streams with one peer, in each direction")
	fs.Int64Var(&o.limitMemory, "limitMemory", defaultLimitMemory,
		"max accounted memory (bytes), all peers together: stream windows, relay buffers, unary messages")
	fs.Int64Var(&o.limitMemoryPerPeer, "limitMemoryPerPeer", defaultLimitMemoryPerPeer,
		"max accounted memory (bytes) for one peer")
	fs.Int64Var(&o.limitMemoryPerConn, "limitMemoryPerConn", defaultLimitMemoryPerConn,
		"max accounted memory (bytes) for one connection (its stream windows)")
}
